"""Model level: Hogwild! attention inside real Hugging Face decoders equals a plain forward where it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.cache import SessionCache
from engine.config import EngineConfig
from engine.model import LoadedModel, load_model
from engine.plan import Run, build_forward

ROPE_VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
}


def load(path: Path) -> tuple[LoadedModel, torch.nn.Module]:
    loaded = load_model(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return loaded, plain


def forward(loaded: LoadedModel, cache: SessionCache, runs: list[Run]) -> torch.Tensor:
    plan = build_forward([(cache, runs)], loaded.inv_freq, loaded.dtype)
    with torch.inference_mode():
        out = loaded.model(input_ids=plan.input_ids, position_ids=plan.position_ids, use_cache=False,
                           hogwild=plan, inv_freq=loaded.inv_freq)
    return out.logits[0]  # (N, V)


def new_cache(loaded: LoadedModel, num_small: int) -> SessionCache:
    return SessionCache(loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, num_small, loaded.dtype, loaded.device)


def flat_order_runs(blocks: list[list[int]]) -> list[Run]:
    """Block i written after blocks 0..i-1, seeing all of them: a view in which the flat sequence is valid."""
    runs, seen = [], []
    for index, tokens in enumerate(blocks):
        runs.append(Run(index, 0, tuple(tokens), tuple(seen)))
        seen.append((index, len(tokens)))
    return runs


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_blocks_written_in_flat_order_equal_a_plain_forward(tiny_model_factory, family: str) -> None:
    loaded, plain = load(tiny_model_factory(family))
    generator = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, 1000, (n,), generator=generator).tolist() for n in (9, 3, 5, 2, 4)]
    cache = new_cache(loaded, len(blocks) - 1)

    hogwild = forward(loaded, cache, flat_order_runs(blocks))
    with torch.inference_mode():
        reference = plain(input_ids=torch.tensor([[t for block in blocks for t in block]])).logits[0]

    torch.testing.assert_close(hogwild, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rope", sorted(ROPE_VARIANTS))
def test_rope_variants_re_rotate_exactly(tiny_model_factory, rope: str) -> None:
    """Later tokens seeing earlier blocks at non-zero offsets, across a second forward, for every RoPE type."""
    loaded, plain = load(tiny_model_factory("llama", rope_parameters=ROPE_VARIANTS[rope]))
    generator = torch.Generator().manual_seed(2)
    blocks = [torch.randint(0, 1000, (n,), generator=generator).tolist() for n in (30, 7, 6)]
    cache = new_cache(loaded, 2)
    runs = flat_order_runs(blocks)

    forward(loaded, cache, runs[:2])
    last = forward(loaded, cache, runs[2:])  # the last block alone, over the stored cache
    with torch.inference_mode():
        reference = plain(input_ids=torch.tensor([[t for block in blocks for t in block]])).logits[0, -len(blocks[2]) :]

    torch.testing.assert_close(last, reference, atol=1e-4, rtol=1e-4)


def test_workers_see_each_others_tokens(tiny_model_dir: Path) -> None:
    """A token written into worker B's block changes worker A's next logits once B's block is in A's view."""
    loaded, _ = load(tiny_model_dir)
    common, step_a = [5, 6, 7, 8], [20, 21]

    def a_logits(b_tokens: list[int], b_visible: bool) -> torch.Tensor:
        cache = new_cache(loaded, 2)  # block 1: A's step, block 2: B's step
        forward(loaded, cache, [Run(0, 0, tuple(common), ()), Run(2, 0, tuple(b_tokens), ((0, 4),))])
        view = ((0, 4), (2, len(b_tokens))) if b_visible else ((0, 4),)
        return forward(loaded, cache, [Run(1, 0, tuple(step_a), view, want_logits=True)])[-1]

    assert not torch.allclose(a_logits([30, 31, 32], True), a_logits([30, 31, 99], True))
    torch.testing.assert_close(a_logits([30, 31, 32], False), a_logits([30, 31, 99], False))
