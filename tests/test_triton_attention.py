"""The Triton attention kernel agrees with the reference and the PyTorch path on random block layouts.

With a CUDA device the kernels run natively, without one in Triton's CPU interpreter (tests/triton_mode.py).
The interpreter cannot multiply bfloat16 tiles, so on CPU float32 and float16 are
covered; bfloat16 runs on CUDA only.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from triton_mode import triton_device

DEVICE = triton_device()
pytest.importorskip("triton", reason="Triton is not installed; the Triton attention tests need it (pip install triton)")

from engine import attention, triton_attention  # noqa: E402
from engine.attention import fast_group_attention, reference_group_attention  # noqa: E402
from engine.cache import SessionCache  # noqa: E402
from engine.config import EngineConfig, SamplingParams, SessionRequest  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.errors import UnsupportedModelError  # noqa: E402
from engine.events import TokenEvent  # noqa: E402
from engine.plan import GroupPlan, Run, build_forward  # noqa: E402
from engine.triton_attention import BLOCK_N, triton_group_attention  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def long_layout(rng: random.Random, num_small: int, max_common: int) -> tuple[list[Run], list[int]]:
    """Runs over blocks long enough for several key tiles, and the blocks' lengths before them.

    Sometimes a run first appends to the common block (a prompt chunk).
    Each small-block run sees a random part of the common block (including what this forward appends to it)
    and a random ordered subset of the other small blocks, then its own block causally.
    """
    lengths = [rng.randint(1, max_common)] + [rng.randint(0, 2 * BLOCK_N) for _ in range(num_small)]
    runs, common_end = [], lengths[0]
    if rng.random() < 0.5:  # a prompt chunk: written to block 0 and seen by the runs after it
        count = rng.randint(1, 24)
        runs.append(Run(0, lengths[0], tuple(range(count)), ()))
        common_end += count
    for own in rng.sample(range(1, num_small + 1), k=rng.randint(1, num_small)):
        others = [b for b in range(1, num_small + 1) if b != own and lengths[b] and rng.random() < 0.7]
        rng.shuffle(others)
        view = ((0, rng.randint(1, common_end)),) + tuple((b, rng.randint(1, lengths[b])) for b in others)
        runs.append(Run(own, lengths[own], tuple(range(rng.randint(1, 4))), view, want_logits=True))
    return runs, lengths


def random_group(
    seed: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str = DEVICE,
    unwritten: float | None = None,
) -> tuple[GroupPlan, torch.Tensor, torch.Tensor]:
    """A session cache of random keys/values, its plan, queries and inv_freq.

    `unwritten`, when given, fills every slot beyond a block's length (slots no token may see).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_small = rng.randint(2, 6)
    runs, lengths = long_layout(rng, num_small, max_common=5 * BLOCK_N)
    cache = SessionCache(1, num_kv_heads, head_dim, num_small, dtype, torch.device(device), 64, 32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    cache.lengths = lengths
    for block, length in enumerate(lengths):
        cache.reserve(block, length)  # views reach up to these lengths, also in blocks no run writes
    # A prompt chunk is planned as a group of its own and written first; the small-block runs form the last group.
    group = build_forward([(cache, runs)], inv_freq, dtype).groups[-1]
    for tensor in (cache.common_k, cache.common_v, cache.small_k, cache.small_v):
        tensor.copy_(torch.randn(tensor.shape).to(tensor))
    if unwritten is not None:
        cache.common_k[:, :, cache.lengths[0] :] = unwritten
        cache.common_v[:, :, cache.lengths[0] :] = unwritten
        for b, length in enumerate(cache.lengths[1:]):
            cache.small_k[:, b, :, length:] = unwritten
            cache.small_v[:, b, :, length:] = unwritten
    n = group.vis.shape[0]
    q = torch.randn(num_q_heads, n, head_dim, device=device).to(dtype)
    return group, q, inv_freq


@pytest.fixture(params=[(0, 0), (1, 0), (0, 1), (1, 1)], ids=["two-dots", "one-dot", "two-dots-one-launch",
                                                                "one-dot-one-launch"])
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Every kernel variant: scores in two dots of depth D/2 (the rotated query's halves) or one of depth D, and
    the common and small blocks in a launch each or in one launch."""
    one_dot, one_launch = request.param
    monkeypatch.setattr(triton_attention, "ONE_DOT", one_dot)
    monkeypatch.setattr(triton_attention, "ONE_LAUNCH", one_launch)
    return request.param


@pytest.mark.usefixtures("variant")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (4, 2), (6, 2)])
@pytest.mark.parametrize("seed", range(3))
def test_triton_matches_reference_and_torch_path(
    dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, seed: int
) -> None:
    group, q, inv_freq = random_group(seed, num_q_heads, num_kv_heads, 64, dtype)
    scale = 64**-0.5

    out = triton_group_attention(group, 0, q, scale, inv_freq, chunk_keys=BLOCK_N)
    reference = reference_group_attention(group, 0, q, scale, inv_freq)
    fast = fast_group_attention(group, 0, q, scale, inv_freq)

    assert out.shape == q.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), reference.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), fast.float(), atol=tol, rtol=tol)


@pytest.mark.usefixtures("variant")
@pytest.mark.parametrize("chunk_keys", [None, BLOCK_N, 2 * BLOCK_N, 64 * BLOCK_N])
def test_the_key_split_does_not_change_the_output(chunk_keys: int | None) -> None:
    """One chunk per block, many chunks, or the default split: the log-sum-exp merge gives one softmax."""
    group, q, inv_freq = random_group(11, 6, 2, 64, torch.float32)
    assert group.common_len > 2 * BLOCK_N, "the layout should span several chunks"

    out = triton_group_attention(group, 0, q, 0.125, inv_freq, chunk_keys=chunk_keys)

    torch.testing.assert_close(out, reference_group_attention(group, 0, q, 0.125, inv_freq), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("merge", [0, 1])
@pytest.mark.parametrize("one_launch", [0, 1])
@pytest.mark.parametrize("seed", [1, 9, 11])  # layouts whose common block and small blocks both span chunks
def test_the_two_tensors_may_split_their_keys_differently(
    seed: int, one_launch: int, merge: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a long session, the common block and the small blocks get chunks of different sizes (here the small
    blocks' are the longer, so a program that kept the common block's split would miss keys). With ONE_LAUNCH
    both take one launch, whose later programs must use the small blocks' own split; otherwise a launch each."""
    monkeypatch.setattr(triton_attention, "ONE_LAUNCH", one_launch)
    monkeypatch.setattr(triton_attention, "MERGE_IN_CHUNKS", merge)
    launches_of = triton_attention._launches

    def uneven_launches(*args: object) -> list[object]:
        common, small = launches_of(*args)
        return [dataclasses.replace(common, chunk_keys=BLOCK_N), dataclasses.replace(small, chunk_keys=2 * BLOCK_N)]

    grids = []
    kernel = triton_attention._chunk_kernel

    class CountedKernel:
        def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_attention, "_launches", uneven_launches)
    monkeypatch.setattr(triton_attention, "_chunk_kernel", CountedKernel())
    group, q, inv_freq = random_group(seed, 4, 2, 64, torch.float32)
    assert group.common_len > 2 * BLOCK_N and group.small_len > BLOCK_N, "both tensors should span several chunks"

    out = triton_group_attention(group, 0, q, 0.125, inv_freq)

    torch.testing.assert_close(out, reference_group_attention(group, 0, q, 0.125, inv_freq), atol=2e-5, rtol=2e-5)
    assert len(grids) == (1 if one_launch else 2)


@pytest.mark.usefixtures("variant")
@pytest.mark.parametrize("seed", range(3))
def test_slots_beyond_a_blocks_length_are_never_read(seed: int) -> None:
    """NaN in every unwritten cache slot leaves the output finite and equal to the reference."""
    group, q, inv_freq = random_group(seed, 4, 2, 64, torch.float32, unwritten=float("nan"))
    out = triton_group_attention(group, 0, q, 0.125, inv_freq, chunk_keys=BLOCK_N)
    assert out.isfinite().all()
    torch.testing.assert_close(out, reference_group_attention(group, 0, q, 0.125, inv_freq), atol=2e-5, rtol=2e-5)


@pytest.fixture
def merge_in_chunks(monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The last chunk program of each row tile and KV head merges; returns the device's counter table."""
    monkeypatch.setattr(triton_attention, "MERGE_IN_CHUNKS", 1)
    return triton_attention._counters(torch.device(DEVICE), 1)


@pytest.mark.parametrize("one_launch", [0, 1])
@pytest.mark.parametrize("chunk_keys", [None, BLOCK_N, 2 * BLOCK_N])
def test_merging_in_the_last_chunk_program_gives_the_same_output(
    merge_in_chunks: torch.Tensor, chunk_keys: int | None, one_launch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layouts of one or two tensors (in a launch each or in one) and one or many chunks per block, merged without
    a merge launch, one call after the other: each matches the reference, so every call finds its counters at
    zero."""
    monkeypatch.setattr(triton_attention, "ONE_LAUNCH", one_launch)
    for seed, (num_q_heads, num_kv_heads) in enumerate([(6, 2), (4, 1), (8, 2), (2, 2)]):
        group, q, inv_freq = random_group(seed, num_q_heads, num_kv_heads, 64, torch.float32)

        out = triton_group_attention(group, 0, q, 0.125, inv_freq, chunk_keys=chunk_keys)

        reference = reference_group_attention(group, 0, q, 0.125, inv_freq)
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=2e-5)
        assert not merge_in_chunks.any(), "every merger resets its counter"


def test_a_failed_launch_leaves_no_counts_behind(
    merge_in_chunks: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the small blocks' launch fails after the common block's ran, the counts the common chunks left are
    cleared: the next call merges when its own chunks are done, not early."""
    monkeypatch.setattr(triton_attention, "ONE_LAUNCH", 0)
    group, q, inv_freq = random_group(1, 4, 2, 64, torch.float32)
    assert group.small_len, "the layout should take two launches"
    kernel = triton_attention._chunk_kernel

    class FailsSecondLaunch:
        launches = 0

        def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
            self.launches += 1
            if self.launches == 2:
                raise RuntimeError("out of resources")
            return kernel[grid]

    monkeypatch.setattr(triton_attention, "_chunk_kernel", FailsSecondLaunch())
    with pytest.raises(RuntimeError, match="out of resources"):
        triton_group_attention(group, 0, q, 0.125, inv_freq, chunk_keys=BLOCK_N)
    assert not merge_in_chunks.any()

    monkeypatch.setattr(triton_attention, "_chunk_kernel", kernel)
    out = triton_group_attention(group, 0, q, 0.125, inv_freq, chunk_keys=BLOCK_N)
    torch.testing.assert_close(out, reference_group_attention(group, 0, q, 0.125, inv_freq), atol=2e-5, rtol=2e-5)


def test_head_dim_128_matches_reference() -> None:
    group, q, inv_freq = random_group(3, 4, 1, 128, torch.float32)
    out = triton_group_attention(group, 0, q, 128**-0.5, inv_freq)
    torch.testing.assert_close(out, reference_group_attention(group, 0, q, 128**-0.5, inv_freq), atol=2e-5, rtol=2e-5)


def test_other_head_dims_are_refused() -> None:
    group, q, inv_freq = random_group(0, 2, 2, 32, torch.float32)
    with pytest.raises(UnsupportedModelError, match="head_dim"):
        triton_group_attention(group, 0, q, 32**-0.5, inv_freq)


def test_cpu_tensors_without_the_interpreter_are_refused() -> None:
    """Outside the interpreter the kernels cannot touch CPU memory: a clear error, not a crash in Triton."""
    script = (
        "import torch\n"
        "from engine.plan import Run, build_forward\n"
        "from engine.cache import SessionCache\n"
        "from engine.triton_attention import triton_group_attention\n"
        "cache = SessionCache(1, 1, 64, 1, torch.float32, torch.device('cpu'))\n"
        "inv_freq = torch.ones(32)\n"
        "group = build_forward([(cache, [Run(0, 0, (1,), ())])], inv_freq, torch.float32).groups[0]\n"
        "triton_group_attention(group, 0, torch.randn(1, 1, 64), 0.125, inv_freq)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "needs CUDA tensors" in result.stderr


@pytest.fixture
def with_triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(attention.BACKENDS, "triton", triton_group_attention)


@pytest.mark.usefixtures("with_triton_backend")
def test_engine_session_with_triton_equals_torch_path(tiny_model_factory: Callable[..., Path]) -> None:
    """A whole 2-worker greedy session gives the same tokens through either backend."""
    path = tiny_model_factory("llama", head_dim=64)
    engine = Engine.load(EngineConfig(model=str(path), device=DEVICE, dtype="float32", cuda_graphs=False))
    request = SessionRequest(
        prompt="Count to five.", num_workers=2, max_tokens=6, sampling=SamplingParams(temperature=0.0),
        final_answer=False,
    )

    def session_tokens(backend: str) -> list[tuple[int, tuple[int, ...]]]:
        engine.attention = backend
        return [(e.worker, e.token_ids) for e in engine.generate(request) if isinstance(e, TokenEvent)]

    torch_tokens = session_tokens("torch")
    assert torch_tokens, "the session should sample tokens"
    assert session_tokens("triton") == torch_tokens

