"""What the HTTP service costs: aggregate tokens/s of one session streamed over SSE vs the engine called directly.

Both paths use the same model, dtype, device, prompt, worker count and budget, with greedy decoding and no
finisher, so both sample exactly workers x max_tokens tokens. The engine is loaded in this process and a
`hogwild serve` is started beside it; after one short warm-up each, the two paths run alternately (never at the same
time), `--repeats` times each, and the table shows each path's best run, which is the one least disturbed by
other work on the machine. Prints a markdown table.

    .venv/bin/python bench/bench_service.py [--model default] [--dtype float32] [--workers 2] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.serving import running_server  # noqa: E402
from engine.config import EngineConfig, SamplingParams, SessionRequest  # noqa: E402
from engine.events import DoneEvent, ErrorEvent, TokenEvent  # noqa: E402

if TYPE_CHECKING:
    from engine.engine import Engine

PROMPT = "Find all integer solutions of x^2 - y^2 = 2024 and explain each step."
WARMUP_TOKENS = 4
DIRECT = "engine.generate (in-process)"
SERVICE = "POST /v1/hogwild/completions (SSE)"


@dataclass(frozen=True)
class Run:
    tokens: int
    seconds: float
    first_token_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model id, folder or hub id (default: the embedded one)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), help="unset: the engine's default for the device"
    )
    parser.add_argument("--workers", type=int, default=2, help="workers in the session (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per worker (default: 256)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per path; the best counts (default: 1)")
    return parser.parse_args()


def session_request(workers: int, max_tokens: int) -> SessionRequest:
    return SessionRequest(
        prompt=PROMPT,
        num_workers=workers,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0),
        redundancy_check_every=0,
        final_answer=False,
    )


def run_direct(engine: Engine, workers: int, max_tokens: int) -> Run:
    started = time.perf_counter()
    first_token = None
    for event in engine.generate(session_request(workers, max_tokens)):
        if isinstance(event, TokenEvent) and first_token is None:
            first_token = time.perf_counter() - started
        if isinstance(event, ErrorEvent):
            raise RuntimeError(event.message)
        if isinstance(event, DoneEvent):
            seconds = time.perf_counter() - started
            return Run(event.usage.completion_tokens, seconds, first_token or seconds)
    raise RuntimeError("the session ended without a DoneEvent")


def run_service(url: str, workers: int, max_tokens: int) -> Run:
    body = {
        "prompt": PROMPT,
        "workers": workers,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "redundancy_check_every": 0,
        "final_answer": False,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first_token = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/hogwild/completions", json=body, timeout=None) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("hogwild", {}).get("kind") == "token" and first_token is None:
                first_token = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    seconds = time.perf_counter() - started
    return Run(tokens, seconds, first_token or seconds)


def print_table(args: argparse.Namespace, runs: dict[str, list[Run]]) -> None:
    best = {path: max(path_runs, key=lambda run: run.tokens_per_second) for path, path_runs in runs.items()}
    print(
        f"Model {args.model} ({args.dtype}, {args.device}), {args.workers} workers x {args.max_tokens} tokens, "
        f"greedy; best of {args.repeats} run(s) per path; {platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    print("| path | tokens | seconds | first token (s) | tokens/s | vs direct |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, run in best.items():
        ratio = run.tokens_per_second / best[DIRECT].tokens_per_second
        print(
            f"| {path} | {run.tokens} | {run.seconds:.2f} | {run.first_token_seconds:.2f} | "
            f"{run.tokens_per_second:.1f} | {ratio:.3f} |"
        )
    overhead = 1 - best[SERVICE].tokens_per_second / best[DIRECT].tokens_per_second
    print(f"\nService overhead: {overhead:+.1%} of aggregate tokens/s")


def main() -> None:
    args = parse_args()
    from engine.engine import Engine

    runs: dict[str, list[Run]] = {DIRECT: [], SERVICE: []}
    env = {"HOGWILD_MODEL": args.model, "HOGWILD_DEVICE": args.device, "HOGWILD_DTYPE": args.dtype or ""}
    with running_server(env) as url:
        engine = Engine.load(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
        args.dtype = str(engine.model.dtype).removeprefix("torch.")  # the table names what ran
        run_direct(engine, args.workers, WARMUP_TOKENS)
        run_service(url, args.workers, WARMUP_TOKENS)
        for _ in range(args.repeats):
            runs[DIRECT].append(run_direct(engine, args.workers, args.max_tokens))
            runs[SERVICE].append(run_service(url, args.workers, args.max_tokens))
    counts = {run.tokens for path_runs in runs.values() for run in path_runs}
    if len(counts) != 1:
        raise RuntimeError(f"the runs sampled different token counts: {sorted(counts)}")
    print_table(args, runs)


if __name__ == "__main__":
    main()
