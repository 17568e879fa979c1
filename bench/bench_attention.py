"""Attention time per layer: Hogwild! workers over one shared cache vs torch SDPA for one sequence.

One decode step of one session: each of W workers feeds one token and sees the common block (C tokens), the two
section labels and every worker's current step (STEP_TOKENS each), its own last. The per-layer call the engine
makes (a backend of engine.attention) is timed against F.scaled_dot_product_attention of one query over ONE
sequence as long as a worker's view. On CUDA, "GPU" columns replay a CUDA graph of several calls (kernel time
only, launches excluded) and "eager" columns time plain calls (launch overhead included, as the engine runs
today); on CPU every column is eager wall time. Prints a markdown table. Example:

    python bench/bench_attention.py --contexts 1024,4096,16384 --workers 1,2,4,8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attention import BACKENDS
from engine.cache import SessionCache
from engine.plan import GroupPlan, Run, build_forward

STEP_TOKENS = 64  # each worker's current step (its unfinished paragraph)
LABEL_TOKENS = 8  # each of the two section labels
ROPE_THETA = 1_000_000.0
GRAPH_CALLS = 20  # calls captured in one CUDA graph
GRAPH_REPLAYS = 5
EAGER_SECONDS = 0.3  # minimum wall time per eager measurement


@dataclass(frozen=True)
class Heads:
    """Attention shape of one layer (default: Qwen3-8B)."""

    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128


@dataclass
class Row:
    context: int
    workers: int
    view_tokens: int
    micros: dict[str, float] = field(default_factory=dict)  # column -> microseconds per layer call


def decode_group(
    context: int, workers: int, heads: Heads, dtype: torch.dtype, device: torch.device
) -> tuple[GroupPlan, torch.Tensor, torch.Tensor]:
    """A session mid-decode with random keys/values: its plan for one token per worker, q (Hq, W, D), inv_freq."""
    dim = heads.head_dim
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    cache = SessionCache(1, heads.num_kv_heads, dim, workers + 2, dtype, device, context, STEP_TOKENS + 1)
    for tensor in (cache.common_k, cache.common_v, cache.small_k, cache.small_v):
        tensor.normal_()
    cache.lengths = [context, LABEL_TOKENS, LABEL_TOKENS] + [STEP_TOKENS] * workers
    runs = []
    for worker in range(workers):
        others = tuple((3 + other, STEP_TOKENS) for other in range(workers) if other != worker)
        view = ((0, context), (1, LABEL_TOKENS)) + others + ((2, LABEL_TOKENS),)
        runs.append(Run(3 + worker, STEP_TOKENS, (0,), view, want_logits=True))
    group = build_forward([(cache, runs)], inv_freq, dtype).groups[0]
    q = torch.randn(heads.num_q_heads, workers, dim, device=device, dtype=dtype)
    return group, q, inv_freq


def view_tokens(context: int, workers: int) -> int:
    """Keys one worker attends to in decode_group's layout (its own new token included)."""
    return context + 2 * LABEL_TOKENS + workers * STEP_TOKENS + 1


def backends(device: torch.device, include_triton: bool) -> dict[str, Callable[..., torch.Tensor]]:
    """The attention paths worth timing on `device`: the Triton kernel (CUDA, when installed) and PyTorch."""
    chosen = {"torch": BACKENDS["torch"]}
    if device.type == "cuda" and include_triton:
        try:
            from engine.triton_attention import triton_group_attention
        except ImportError:
            return chosen
        chosen = {"triton": triton_group_attention, **chosen}
    return chosen


def eager_micros(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall time of one call over batches of calls (each batch synchronised once)."""
    fn()
    samples = []
    deadline = time.perf_counter() + EAGER_SECONDS
    while time.perf_counter() < deadline or len(samples) < 3:
        start = time.perf_counter()
        for _ in range(10):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) / 10)
    return statistics.median(samples) * 1e6


def graph_micros(fn: Callable[[], object]) -> float:
    """GPU time of one call: a CUDA graph of GRAPH_CALLS calls, replayed GRAPH_REPLAYS times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles kernels and warms the allocator outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GRAPH_REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (GRAPH_CALLS * GRAPH_REPLAYS)


def measure(
    context: int, workers: int, heads: Heads, dtype: torch.dtype, device: torch.device, include_triton: bool
) -> Row:
    """One row: SDPA over one sequence, then every backend over the Hogwild! layout of the same length."""
    row = Row(context, workers, view_tokens(context, workers))
    length, dim = row.view_tokens, heads.head_dim
    q1 = torch.randn(1, heads.num_q_heads, 1, dim, device=device, dtype=dtype)
    k1 = torch.randn(1, heads.num_kv_heads, length, dim, device=device, dtype=dtype)
    v1 = torch.randn_like(k1)
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q1, k1, v1, enable_gqa=True)}
    group, q, inv_freq = decode_group(context, workers, heads, dtype, device)
    scale = dim**-0.5
    for name, attend in backends(device, include_triton).items():
        calls[name] = lambda attend=attend: attend(group, 0, q, scale, inv_freq)
    for name, call in calls.items():
        if device.type == "cuda":
            row.micros[f"{name} GPU"] = graph_micros(call)
        row.micros[f"{name} eager"] = eager_micros(call, device)
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def table(rows: list[Row], heads: Heads, dtype: torch.dtype, device: torch.device) -> str:
    """Markdown: microseconds per layer for every column; Hogwild! columns also as a multiple of SDPA."""
    columns = list(rows[0].micros)
    caption = (
        f"Attention per layer, one decode step, {device_name(device)}, {str(dtype).removeprefix('torch.')}, "
        f"{heads.num_q_heads} query / {heads.num_kv_heads} KV heads of {heads.head_dim}; each worker's step "
        f"holds {STEP_TOKENS} tokens; SDPA is one sequence as long as one worker's view. Microseconds."
    )
    lines = [
        caption,
        "",
        "| context | workers | view tokens | " + " | ".join(columns) + " |",
        "|---:|---:|---:|" + "---:|" * len(columns),
    ]
    for r in rows:
        cells = []
        for column in columns:
            kind = column.split(" ")[-1]
            sdpa = r.micros[f"sdpa {kind}"]
            ratio = f" ({r.micros[column] / sdpa:.2f}x)" if not column.startswith("sdpa") else ""
            cells.append(f"{r.micros[column]:.1f}{ratio}")
        lines.append(f"| {r.context} | {r.workers} | {r.view_tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attention_table(
    contexts: list[int],
    workers: list[int],
    heads: Heads,
    dtype: torch.dtype,
    device: torch.device,
    include_triton: bool = True,
) -> str:
    rows = []
    for context in contexts:
        for count in workers:
            rows.append(measure(context, count, heads, dtype, device, include_triton))
            print(f"  context {context}, {count} workers: " + ", ".join(
                f"{name} {us:.1f} us" for name, us in rows[-1].micros.items()), flush=True)
    return table(rows, heads, dtype, device)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument(
        "--contexts", type=int_list, default=None, help="default 1024,4096,16384 (GPU), 1024,4096 (CPU)"
    )
    parser.add_argument("--workers", type=int_list, default=[1, 2, 4, 8])
    parser.add_argument("--heads", type=int, default=Heads.num_q_heads, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=Heads.num_kv_heads)
    parser.add_argument("--head-dim", type=int, default=Heads.head_dim)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    contexts = args.contexts or ([1024, 4096, 16384] if device.type == "cuda" else [1024, 4096])
    heads = Heads(args.heads, args.kv_heads, args.head_dim)
    with torch.inference_mode():
        print(attention_table(contexts, args.workers, heads, getattr(torch, args.dtype), device))


if __name__ == "__main__":
    main()
