"""Sweeps the Triton attention's launch parameters on a GPU and prints what each costs.

Coordinate descent from the current defaults: one parameter (or one group of parameters, swept jointly) at a time
takes each of its candidate values (the others held), the best value stays, and the next is swept. "Best" is the
geometric mean over a few decode layouts (bench_attention.decode_group, Qwen3-8B heads) of the kernel's GPU time
divided by SDPA's over one sequence of the same length, both timed in CUDA graphs. Prints one markdown row per
configuration tried and the winner; --then-bench runs bench/bench_gpu.py in the same process with the winner
applied.

    python bench/tune_triton.py                                   # GPU only, about a minute
    python bench/tune_triton.py --then-bench --budget-s 200       # then the GPU tables with the winner
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import Heads, attention_table, decode_group, device_name, graph_micros, view_tokens

CASES = [(16384, 4), (16384, 1), (1024, 4), (4096, 8)]  # (context, workers)
# Module constants of engine.triton_attention and the values tried, swept in this order. A group of names is swept
# jointly: programs per SM, tile width and pipeline depth trade against each other through shared memory (two
# programs fit on a multiprocessor only with narrower tiles or fewer stages), so one at a time misses the pairs.
SWEEPS: list[tuple[tuple[str, ...], list[tuple[int, ...]]]] = [
    (("ONE_DOT",), [(0,), (1,)]),
    (("ONE_LAUNCH",), [(0,), (1,)]),
    (("PROGRAMS_PER_SM", "BLOCK_N", "DEFAULT_STAGES"), list(itertools.product([1, 2, 3], [64, 128], [2, 3, 4]))),
    (("MIN_CHUNK_TILES",), [(1,), (2,), (4,), (8,)]),
    (("CHUNK_WARPS",), [(4,), (8,)]),
    (("MERGE_DIMS",), [(16,), (32,)]),
    (("MERGE_IN_CHUNKS",), [(0,), (1,)]),
]
QWEN3_8B_HEADS = Heads(32, 8, 128)


def sdpa_micros(context: int, workers: int, heads: Heads, device: torch.device) -> float:
    length = view_tokens(context, workers)
    q = torch.randn(1, heads.num_q_heads, 1, heads.head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, heads.num_kv_heads, length, heads.head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return graph_micros(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def kernel_micros(context: int, workers: int, heads: Heads, device: torch.device) -> float:
    from engine.triton_attention import triton_group_attention

    group, q, inv_freq = decode_group(context, workers, heads, torch.bfloat16, device)
    scale = heads.head_dim**-0.5
    return graph_micros(lambda: triton_group_attention(group, 0, q, scale, inv_freq))


def tune(device: torch.device, budget_s: float, only: set[str] | None = None) -> dict[str, int]:
    """Sweeps SWEEPS in order from the module's current values; no new configuration starts after `budget_s`.
    With `only`, the sweeps of those names alone run (the other parameters keep their values)."""
    import engine.triton_attention as kernel

    sweeps = [(group, values) for group, values in SWEEPS if only is None or only & set(group)]
    baseline = {case: sdpa_micros(*case, QWEN3_8B_HEADS, device) for case in CASES}
    deadline = time.perf_counter() + budget_s
    names = [name for group, _ in SWEEPS for name in group]
    best = {name: getattr(kernel, name) for name in names}
    tried: dict[tuple[int, ...], float] = {}
    skipped: set[tuple[int, ...]] = set()  # configurations the time budget left unmeasured
    case_names = " | ".join(f"{c // 1024}k x {w} (us)" for c, w in CASES)
    sdpa = ", ".join(f"{c // 1024}k x {w}: {us:.1f} us" for (c, w), us in baseline.items())
    print(f"Triton attention launch parameters, {device_name(device)}, bfloat16, {QWEN3_8B_HEADS}; GPU time per "
          f"layer in CUDA graphs. SDPA: {sdpa}")
    print(f"\n| {' | '.join(names)} | {case_names} | geomean vs SDPA |")
    print("|" + "---:|" * (len(names) + len(CASES) + 1))
    for group, candidates in sweeps:
        scores = {}
        for values in candidates:
            config = best | dict(zip(group, values, strict=True))
            key = tuple(config[n] for n in names)
            if key not in tried:
                if time.perf_counter() > deadline:
                    skipped.add(key)
                    continue
                for n, v in config.items():
                    setattr(kernel, n, v)
                try:
                    micros = [kernel_micros(*case, QWEN3_8B_HEADS, device) for case in CASES]
                except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or fit is skipped
                    print(f"| {' | '.join(str(config[n]) for n in names)} | failed: {type(exc).__name__} |")
                    tried[key] = math.inf
                    continue
                logs = [math.log(m / baseline[case]) for m, case in zip(micros, CASES, strict=True)]
                ratio = math.exp(sum(logs) / len(CASES))
                tried[key] = ratio
                cells = " | ".join(f"{m:.1f}" for m in micros)
                print(f"| {' | '.join(str(config[n]) for n in names)} | {cells} | {ratio:.2f} |", flush=True)
            scores[values] = tried[key]
        if scores:
            for n, v in zip(group, min(scores, key=scores.get), strict=True):
                best[n] = v
    for n, v in best.items():
        setattr(kernel, n, v)
    chosen = ", ".join(f"{n} = {v}" for n, v in best.items())
    score = tried.get(tuple(best.values()))
    print(f"\nBest: {chosen} " + (f"(geomean {score:.2f}x SDPA)" if score is not None else "(not measured)")
          + (f"; {len(skipped)} configurations skipped by the time budget" if skipped else ""))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--then-bench", action="store_true", help="run bench_gpu.py with the winner applied")
    parser.add_argument("--sweep-budget-s", type=float, default=150.0, help="no new configuration starts after this")
    parser.add_argument("--only", default=None, help="comma-separated parameters: sweep only the groups holding them")
    parser.add_argument("--then-attention", action="store_true",
                        help="print bench_gpu.py's attention table (section 2) with the winner applied")
    parser.add_argument("--budget-s", type=float, default=200.0, help="bench_gpu.py's --budget-s")
    parser.add_argument("--steps", type=int, default=32, help="bench_gpu.py's --steps")
    parser.add_argument("--no-throughput", action="store_true", help="bench_gpu.py's --no-throughput")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_triton.py needs a CUDA device")
    with torch.inference_mode():
        only = set(args.only.split(",")) if args.only else None
        unknown = (only or set()) - {name for group, _ in SWEEPS for name in group}
        if unknown:
            parser.error(f"--only: no sweep holds {', '.join(sorted(unknown))}")
        tune(torch.device("cuda"), args.sweep_budget_s, only)
        if args.then_attention:
            print(attention_table([1024, 4096, 16384], [1, 2, 4, 8], QWEN3_8B_HEADS, torch.bfloat16,
                                  torch.device("cuda")))
    if args.then_bench:
        import bench_gpu

        sys.argv = [bench_gpu.__file__, "--budget-s", str(args.budget_s), "--steps", str(args.steps)]
        sys.argv += ["--no-throughput"] if args.no_throughput else []
        bench_gpu.main()


if __name__ == "__main__":
    main()
