"""Aggregate decode tokens/s: Hogwild! workers over one shared cache vs HF generate of N independent sequences.

Both run the same model, dtype and prompt length; only decode steps are timed (prefill excluded). Prints a
markdown table. Example:

    python bench/bench_engine.py --workers 1,2,4 --contexts 1024,4096 --new-tokens 32
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from engine.config import EngineConfig, SamplingParams, SessionRequest
from engine.engine import Engine
from engine.events import ErrorEvent, Event, TokenEvent

FILLER = (
    "The committee reviewed the quarterly figures, compared them with the forecasts from the spring, and noted "
    "where the differences came from before writing the summary for the board. "
)


@dataclass
class Row:
    context: int
    workers: int
    hogwild_tps: float
    hf_tps: float
    hogwild_step_ms: float
    hf_step_ms: float


class StepClock(BaseStreamer):
    """Timestamps every generate() step; the first put() is the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def checked_step(engine: Engine) -> list[Event]:
    """One engine step; a session that failed in it (out of memory, say) raises instead of vanishing."""
    events = [event for _, event in engine.step()]
    for event in events:
        if isinstance(event, ErrorEvent):
            raise RuntimeError(f"the benchmark session failed: {event.message}")
    return events


def task_of_length(engine: Engine, tokens: int, workers: int) -> str:
    """A prompt whose chat-formatted common block for `workers` workers (their rules grow with the team) is
    about `tokens` long."""
    probe = SessionRequest(prompt="x", num_workers=workers, max_tokens=1)
    overhead = engine.check(probe)
    per_filler = len(engine.model.tokenizer.encode(FILLER))
    text = FILLER * max(1, (tokens - overhead) // per_filler)
    return text + "\nSummarise the notes above."


def hogwild_decode(engine: Engine, task: str, workers: int, new_tokens: int) -> float:
    """Seconds per lockstep decode step (all workers advance by one token)."""
    request = SessionRequest(
        prompt=task, num_workers=workers, max_tokens=new_tokens + 1, redundancy_check_every=0, final_answer=False,
        sampling=SamplingParams(temperature=1.0, seed=0),
    )
    engine.add_session("bench", request)
    while not any(isinstance(e, TokenEvent) for e in checked_step(engine)):
        pass  # prefill chunks, then the first sampled token
    start, steps = time.perf_counter(), 0
    while engine.num_running:
        checked_step(engine)
        steps += 1
    return (time.perf_counter() - start) / steps


def hf_decode(model: torch.nn.Module, prompt_ids: list[int], sequences: int, new_tokens: int) -> float:
    """Seconds per decode step of HF generate over `sequences` independent copies of the prompt."""
    clock = StepClock()
    input_ids = torch.tensor([prompt_ids] * sequences, device=model.device)
    with torch.inference_mode():
        model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, max_new_tokens=new_tokens + 1,
            min_new_tokens=new_tokens + 1, streamer=clock, pad_token_id=0,
        )
    return (clock.times[-1] - clock.times[1]) / (len(clock.times) - 2)


def run(args: argparse.Namespace) -> list[Row]:
    engine = Engine.load(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_tokens=100_000))
    engine.model.eos_token_ids = frozenset()  # measure full-length runs
    args.dtype = str(engine.model.dtype).removeprefix("torch.")  # the table names what ran
    plain = AutoModelForCausalLM.from_pretrained(
        engine_path(args.model), dtype=engine.model.dtype, attn_implementation="sdpa"
    ).to(engine.model.device).eval()
    rows = []
    for context in args.contexts:
        for workers in args.workers:
            task = task_of_length(engine, context, workers)
            prompt_ids = engine._prompt_ids(SessionRequest(prompt=task, num_workers=workers))  # what HF gets too
            hogwild = hogwild_decode(engine, task, workers, args.new_tokens)
            hf = hf_decode(plain, prompt_ids, workers, args.new_tokens)
            rows.append(Row(len(prompt_ids), workers, workers / hogwild, workers / hf, hogwild * 1e3, hf * 1e3))
            print(f"  context {len(prompt_ids)}, {workers} workers: hogwild {workers / hogwild:.1f} tok/s, "
                  f"HF generate {workers / hf:.1f} tok/s", flush=True)
    return rows


def engine_path(model: str) -> str:
    if model == "default":
        from engine.default_model import ensure_default_model

        return str(ensure_default_model())
    return model


def table(rows: list[Row], args: argparse.Namespace) -> str:
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
    lines = [
        f"Model {args.model}, {args.dtype}, {device}; {args.new_tokens} decode steps per run, prefill excluded.",
        "",
        "| context | workers | Hogwild tok/s | HF generate tok/s | Hogwild / HF | Hogwild step ms | HF step ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r.context: r.hogwild_tps for r in rows if r.workers == 1}
    for r in rows:
        speedup = f" ({r.hogwild_tps / base[r.context]:.2f}x)" if r.context in base and r.workers > 1 else ""
        lines.append(
            f"| {r.context} | {r.workers} | {r.hogwild_tps:.1f}{speedup} | {r.hf_tps:.1f} | "
            f"{r.hogwild_tps / r.hf_tps:.2f} | {r.hogwild_step_ms:.1f} | {r.hf_step_ms:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default', a local folder or a hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="unset: the engine's default for the device"
    )
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    args = parser.parse_args()
    print(table(run(args), args))


if __name__ == "__main__":
    main()
