"""The fast attention path agrees with its token-by-token reference on random block layouts."""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention import fast_group_attention, reference_group_attention
from engine.cache import SessionCache
from engine.plan import Run, build_forward

HEAD_DIM = 16


def random_layout(rng: random.Random, num_small: int) -> tuple[list[int], list[Run]]:
    """Random block lengths and runs: each run appends to one small block and sees a random ordered subset."""
    lengths = [rng.randint(1, 40)] + [rng.randint(0, 12) for _ in range(num_small)]
    runs = []
    for own in rng.sample(range(1, num_small + 1), k=rng.randint(1, num_small)):
        others = [b for b in range(1, num_small + 1) if b != own and lengths[b] and rng.random() < 0.7]
        rng.shuffle(others)
        view = ((0, rng.randint(1, lengths[0])),) + tuple((b, rng.randint(1, lengths[b])) for b in others)
        count = rng.randint(1, 4)
        runs.append(Run(own, lengths[own], tuple(range(count)), view, want_logits=True))
    return lengths, runs


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (6, 2), (9, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_fast_attention_matches_reference(
    dtype: torch.dtype, tolerance: float, num_q_heads: int, num_kv_heads: int, seed: int
) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_small = rng.randint(2, 6)
    lengths, runs = random_layout(rng, num_small)
    cache = SessionCache(1, num_kv_heads, HEAD_DIM, num_small, dtype, torch.device("cpu"), 64, 32)
    for tensor in (cache.common_k, cache.common_v, cache.small_k, cache.small_v):
        tensor.copy_(torch.randn(tensor.shape))
    cache.lengths = lengths
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    group = build_forward([(cache, runs)], inv_freq, dtype).groups[0]
    n = sum(len(r.token_ids) for r in runs)
    # Laid out as in a forward: heads transposed out of the model's (tokens, heads, D), a slice of the packed row.
    q = torch.randn(n + 2, num_q_heads, HEAD_DIM).to(dtype).transpose(0, 1)[:, 1:-1]

    fast = fast_group_attention(group, 0, q, HEAD_DIM**-0.5, inv_freq)
    reference = reference_group_attention(group, 0, q, HEAD_DIM**-0.5, inv_freq)

    assert fast.shape == (num_q_heads, n, HEAD_DIM)
    torch.testing.assert_close(fast.float(), reference.float(), atol=tolerance, rtol=tolerance)


def test_hidden_blocks_do_not_change_the_output() -> None:
    """Keys a token cannot see (beyond its visible length, or blocks outside its view) have no effect."""
    torch.manual_seed(0)
    cache = SessionCache(1, 2, HEAD_DIM, 3, torch.float32, torch.device("cpu"), 64, 32)
    for tensor in (cache.common_k, cache.common_v, cache.small_k, cache.small_v):
        tensor.copy_(torch.randn(tensor.shape))
    cache.lengths = [20, 5, 6, 0]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    run = Run(3, 0, (1,), ((0, 10), (1, 3)), want_logits=True)
    q = torch.randn(4, 1, HEAD_DIM)
    def attend() -> torch.Tensor:
        group = build_forward([(cache, [run])], inv_freq, torch.float32).groups[0]
        return fast_group_attention(group, 0, q, 0.25, inv_freq)

    before = attend()
    cache.common_k[0, :, 10:20] = torch.randn(2, 10, HEAD_DIM)  # beyond the visible 10
    cache.small_k[0, 1] = torch.randn(cache.small_k[0, 1].shape)  # block 2 is not in the view
    torch.testing.assert_close(before, attend())


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("start", [0, 17])
def test_prompt_chunk_takes_the_causal_path_and_matches_reference(
    dtype: torch.dtype, tolerance: float, num_q_heads: int, num_kv_heads: int, start: int
) -> None:
    """A prompt chunk (common block only) that shares its forward with labels and a worker's first step is
    planned as its own group, attended by the fused causal kernel, and agrees with the reference; so does the
    group after it, which reads the common keys the prompt group has just written."""
    torch.manual_seed(start)
    cache = SessionCache(1, num_kv_heads, HEAD_DIM, 3, dtype, torch.device("cpu"), 64, 32)
    for tensor in (cache.common_k, cache.common_v, cache.small_k, cache.small_v):
        tensor.copy_(torch.randn(tensor.shape))
    cache.lengths = [start, 0, 0, 0]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    end = start + 9
    runs = [
        Run(0, start, tuple(range(9)), ()),
        Run(1, 0, (1, 2), ((0, end),)),
        Run(3, 0, (3, 4, 5), ((0, end), (1, 2)), want_logits=True),
    ]
    plan = build_forward([(cache, runs)], inv_freq, dtype)

    prompt, rest = plan.groups
    assert prompt.is_prompt and not rest.is_prompt
    assert (prompt.rows, rest.rows) == (slice(0, 9), slice(9, 14))
    for group in plan.groups:
        q = torch.randn(num_q_heads, group.rows.stop - group.rows.start, HEAD_DIM).to(dtype)
        fast = fast_group_attention(group, 0, q, HEAD_DIM**-0.5, inv_freq)
        reference = reference_group_attention(group, 0, q, HEAD_DIM**-0.5, inv_freq)
        torch.testing.assert_close(fast.float(), reference.float(), atol=tolerance, rtol=tolerance)


def test_a_view_past_the_cache_is_refused_before_any_kernel_reads_it() -> None:
    cache = SessionCache(1, 2, HEAD_DIM, 2, torch.float32, torch.device("cpu"), 64, 32)
    cache.lengths = [cache.common_k.shape[2] + 1, 0, 0]  # claims more common keys than the cache holds
    inv_freq = torch.ones(HEAD_DIM // 2)
    with pytest.raises(ValueError, match="reaches past"):
        build_forward([(cache, [Run(1, 0, (1,), ((0, cache.lengths[0]),))])], inv_freq, torch.float32)


@pytest.mark.parametrize(
    "limit,expected",
    [
        (0, [256, 512, 768, 1280, 2048, 3072, 4608]),  # x1.5, rounded up to 256-token chunks
        (4100, [256, 512, 768, 1280, 2048, 3072, 4352]),  # the growth to 4608 stops at the limit (rounded up)
        (1000, [256, 512, 768, 1024, 1536, 2304, 3584, 5376]),  # stops at the limit, then x1.5 past it
    ],
)
def test_a_cache_grows_by_half_again_and_stops_at_its_limit(limit: int, expected: list[int]) -> None:
    """Growth is amortised (a handful of copies from 256 to 4096 tokens), stops at the limit while the limit holds
    what is needed, and stays amortised past a limit that proved too small."""
    cache = SessionCache(1, 1, 4, 1, torch.float32, torch.device("cpu"), common_limit=limit)
    capacities = [cache.common_k.shape[2]]
    for length in range(1, 4097):
        cache.reserve(0, length)
        if cache.common_k.shape[2] != capacities[-1]:
            capacities.append(cache.common_k.shape[2])
    assert capacities == expected
