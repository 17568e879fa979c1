"""The GPU benchmark in one script: correctness, attention per layer, aggregate tokens/s.

Sections, in order (each printed as a markdown table and, when $OUT is set, rewritten to $OUT/gpu_tables.md as
soon as it is done, so a run cut short keeps what finished):
1. Correctness: the Triton attention against the reference on random block layouts (every dtype the device
   runs), and a 4-worker greedy session of a tiny random Llama that must give the same tokens with the "triton"
   and "torch" backends, and (on CUDA) with decode steps replayed from CUDA graphs.
2. Attention per layer for 1, 2, 4, 8 workers vs SDPA over one sequence (bench_attention.py).
3. Aggregate decode tokens/s for 1, 2, 4, 8 workers at 1k, 16k, 4k context (target rows first): the engine with a
   Qwen3-8B-shaped model, eager and with decode steps replayed from CUDA graphs, vs HF generate of the same model
   with N copies of the prompt, both greedy. Prefill is excluded.
Nothing is downloaded: models are built from configs with random weights (speed does not depend on weight
values) and a word-level tokenizer is built in memory ("w17" is token 17), so prompts are random token ids.
Random weights never write a sentence end and a blank line, so no step ends: every worker's block only grows.
Rows of section 3 that would start more than --budget-s seconds into it are listed as skipped.

    python bench/bench_gpu.py                 # on the GPU machine (about 2 minutes on an H200)
    python bench/bench_gpu.py --smoke         # anywhere, tiny shapes, seconds (CPU: Triton's interpreter)
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton runs CPU tensors only in its interpreter, chosen when first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers
from bench_attention import Heads, attention_table, device_name
from bench_engine import StepClock, checked_step
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from engine import attention
from engine.attention import ATTENTION_NAME, reference_group_attention
from engine.cache import SessionCache
from engine.config import EngineConfig, SamplingParams, SessionRequest
from engine.decode_graphs import DecodeGraphs
from engine.engine import Engine
from engine.events import TokenEvent
from engine.model import LoadedModel, check_architecture, register_attention
from engine.plan import GroupPlan, Run, build_forward

GREEDY = SamplingParams(temperature=0.0)
WARMUP_STEPS = 3  # decode steps run before timing starts
WARM_UP_CONTEXT = 256  # prompt tokens of the untimed runs that compile kernels first
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
QWEN3_8B = {  # Qwen3-8B's published shape
    "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
}
TINY = {
    "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    device: torch.device
    layers: int
    contexts: list[int]
    workers: list[int]
    steps: int  # timed decode steps per run
    shape: dict[str, object]  # config values of the benchmarked model family
    shape_name: str
    check_layouts: int  # random layouts per dtype in the kernel check
    check_common: int  # longest common block of the random layouts
    check_tokens: int  # greedy tokens per worker in the engine-level check
    row_budget_s: float  # seconds into the throughput section after which no new row starts


class Report:
    """Markdown sections, printed and rewritten to $OUT/gpu_tables.md after each one."""

    def __init__(self, header: str) -> None:
        out = os.environ.get("OUT")
        self.path = Path(out) / "gpu_tables.md" if out else None
        self.sections: list[str] = []
        self.add(header)

    def add(self, section: str) -> None:
        self.sections.append(section)
        print("\n" + section + "\n", flush=True)
        if self.path:
            self.path.write_text("\n\n".join(self.sections) + "\n")


# ---- models built from configs ------------------------------------------------------------------------------


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Whitespace-separated words "w1".."w{V-1}" are tokens 1..V-1; anything else is [UNK] (0)."""
    vocab = {"[UNK]": 0} | {f"w{i}": i for i in range(1, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def random_model(
    family: str, shape: dict[str, object], layers: int, dtype: torch.dtype, device: torch.device
) -> LoadedModel:
    """A random-weight model built on `device`, wired for Hogwild! attention like engine.model.load_model."""
    config = AutoConfig.for_model(family, num_hidden_layers=layers, use_sliding_window=False, **shape)
    context = check_architecture(config)
    register_attention()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME)
    model.eval()
    return LoadedModel(
        name=f"random-{family}-{layers}-layers",
        model=model,
        tokenizer=word_tokenizer(shape["vocab_size"]),
        device=device,
        dtype=dtype,
        inv_freq=model.model.rotary_emb.inv_freq.detach().to(device, torch.float32),
        num_layers=layers,
        num_kv_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        context_length=context,
        eos_token_ids=frozenset(),  # runs always last their full length
    )


def words(rng: random.Random, count: int, vocab_size: int) -> str:
    return " ".join(f"w{rng.randrange(1, vocab_size)}" for _ in range(count))


# ---- 1. correctness -----------------------------------------------------------------------------------------


def random_layout_group(
    rng: random.Random, dtype: torch.dtype, plan: Plan
) -> tuple[GroupPlan, torch.Tensor, torch.Tensor]:
    """A random session: common block, labels and worker steps of random lengths; random views; random q/k/v."""
    heads = Heads(plan.shape["num_attention_heads"], plan.shape["num_key_value_heads"], plan.shape["head_dim"])
    num_small = rng.randint(3, 10)
    lengths = [rng.randint(1, plan.check_common)] + [rng.randint(0, 200) for _ in range(num_small)]
    runs = []
    for own in rng.sample(range(1, num_small + 1), k=rng.randint(1, num_small)):
        others = [b for b in range(1, num_small + 1) if b != own and lengths[b] and rng.random() < 0.7]
        rng.shuffle(others)
        view = ((0, rng.randint(1, lengths[0])),) + tuple((b, rng.randint(1, lengths[b])) for b in others)
        runs.append(Run(own, lengths[own], tuple(range(rng.randint(1, 4))), view, want_logits=True))
    dim = heads.head_dim
    cache = SessionCache(1, heads.num_kv_heads, dim, num_small, dtype, plan.device, 64, 64)
    cache.lengths = lengths
    for block, length in enumerate(lengths):
        cache.reserve(block, length)  # views reach up to these lengths, also in blocks no run writes
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, dim, 2, device=plan.device, dtype=torch.float32) / dim))
    group = build_forward([(cache, runs)], inv_freq, dtype).groups[0]
    for tensor in (cache.common_k, cache.common_v, cache.small_k, cache.small_v):
        tensor.normal_()
    q = torch.randn(heads.num_q_heads, group.vis.shape[0], dim, device=plan.device, dtype=dtype)
    return group, q, inv_freq


def register_triton_backend() -> None:
    """Makes "triton" a backend name of engine.attention whether or not the engine registers it itself."""
    from engine.triton_attention import triton_group_attention

    attention.BACKENDS.setdefault("triton", triton_group_attention)


def kernel_check(plan: Plan) -> tuple[str, bool]:
    """Triton vs reference on random layouts, per dtype and kernel variant: the worst error against its tolerance.

    Every variant is checked whichever is the default: the tuner may pick any of them on this GPU."""
    import engine.triton_attention as kernel

    triton_group_attention = attention.BACKENDS["triton"]
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if plan.device.type == "cuda" else [torch.float32]
    lines = ["| dtype | scores | launches | merge | layouts | max abs error vs reference | tolerance | result |",
             "|---|---|---|---|---:|---:|---:|---|"]
    ok, defaults = True, (kernel.ONE_DOT, kernel.ONE_LAUNCH, kernel.MERGE_IN_CHUNKS)
    try:
        for dtype, one_dot, one_launch, merge in itertools.product(dtypes, (0, 1), (0, 1), (0, 1)):
            kernel.ONE_DOT, kernel.ONE_LAUNCH, kernel.MERGE_IN_CHUNKS = one_dot, one_launch, merge
            rng, worst, passed, tol = random.Random(0), 0.0, True, TOLERANCE[dtype]
            for _ in range(plan.check_layouts):
                group, q, inv_freq = random_layout_group(rng, dtype, plan)
                scale = q.shape[-1] ** -0.5
                out = triton_group_attention(group, 0, q, scale, inv_freq).float()
                reference = reference_group_attention(group, 0, q, scale, inv_freq).float()
                error = (out - reference).abs()
                worst = max(worst, error.max().item())
                passed &= bool((error <= tol + tol * reference.abs()).all())  # torch.testing.assert_close's rule
            ok &= passed
            name = str(dtype).removeprefix("torch.")
            scores = "one dot" if one_dot else "two dots"
            launches = "one for all blocks" if one_launch else "common, small"
            how = "in chunk programs" if merge else "own launch"
            result = "ok" if passed else "FAIL"
            lines.append(f"| {name} | {scores} | {launches} | {how} | {plan.check_layouts} | {worst:.2e} | {tol:.0e} "
                         f"| {result} |")
    finally:
        kernel.ONE_DOT, kernel.ONE_LAUNCH, kernel.MERGE_IN_CHUNKS = defaults
    return "\n".join(lines), ok


def session_check(plan: Plan) -> tuple[str, bool]:
    """A 4-worker greedy session of a tiny random Llama (float32) through both backends: same tokens."""
    model = random_model("llama", TINY | {"hidden_size": 256}, 2, torch.float32, plan.device)  # 4 heads x 64
    engine = Engine(model, EngineConfig(max_tokens=plan.check_tokens, cuda_graphs=False))  # graphs: set below
    prompt = words(random.Random(1), 40, TINY["vocab_size"])
    request = SessionRequest(
        prompt=prompt, num_workers=4, max_tokens=plan.check_tokens, sampling=GREEDY, redundancy_check_every=0,
        final_answer=False,
    )
    def session_tokens() -> list[tuple[int, tuple[int, ...]]]:
        return [(e.worker, e.token_ids) for e in engine.generate(request) if isinstance(e, TokenEvent)]

    tokens = {}
    for backend in ("torch", "triton"):
        engine.attention = backend
        tokens[backend] = session_tokens()
    same = tokens["torch"] == tokens["triton"] and len(tokens["torch"]) > 0
    rows = [f"| 4 workers x {plan.check_tokens} greedy tokens, tiny Llama, float32: triton vs torch backend | "
            f"{'same tokens' if same else 'DIFFERENT'} |"]
    if plan.device.type == "cuda":
        engine.graphs = graphs = DecodeGraphs(engine.forward_logits)
        graphed = session_tokens()
        engine.graphs = None
        graphs_same = graphed == tokens["triton"]
        verdict = "same tokens" if graphs_same else "DIFFERENT"
        state = f"{graphs.captures} captures, {graphs.replays} replays" + ("" if graphs.enabled else ", turned off")
        rows.append(f"| the same session, triton with CUDA graphs vs triton eager | {verdict} ({state}) |")
        same = same and graphs_same
    return "| engine session | result |\n|---|---|\n" + "\n".join(rows), same


# ---- 3. aggregate tokens/s ----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hogwild_tokens_per_s(engine: Engine, context: int, workers: int, steps: int, graphs: bool = False) -> float:
    """Aggregate sampled tokens/s over `steps` lockstep decode steps of one session with `workers` workers,
    with decode steps replayed from CUDA graphs when `graphs` (captured during the warm-up steps)."""
    m = engine.model
    vocab = m.model.config.vocab_size
    probe = SessionRequest(prompt="w1", num_workers=workers, max_tokens=1)
    filler = words(random.Random(context), max(1, context - engine.check(probe) + 1), vocab)
    request = SessionRequest(
        prompt=filler, num_workers=workers, max_tokens=WARMUP_STEPS + steps + 2, sampling=GREEDY,
        redundancy_check_every=0, final_answer=False,
    )
    engine.graphs = DecodeGraphs(engine.forward_logits) if graphs else None
    engine.add_session("bench", request)
    try:
        # Prefill chunks (as many as the prefix cache leaves to compute), up to the first sampled tokens.
        while not any(isinstance(event, TokenEvent) for event in checked_step(engine)):
            pass
        for _ in range(WARMUP_STEPS):
            checked_step(engine)
        replays = engine.graphs.replays if engine.graphs is not None else 0
        synchronize(m.device)
        start = time.perf_counter()
        for _ in range(steps):
            checked_step(engine)  # the chosen token ids reach the host, so each step ends synchronised
        seconds = time.perf_counter() - start
        if engine.num_running != 1:
            raise RuntimeError("the session ended before the timed decode steps did")
        if graphs and (engine.graphs is None or not engine.graphs.enabled or engine.graphs.replays - replays < steps):
            raise RuntimeError("the timed decode steps did not all replay a CUDA graph")
        return workers * steps / seconds
    finally:
        engine.cancel("bench")
        engine.graphs = None


def hf_tokens_per_s(m: LoadedModel, context: int, sequences: int, steps: int) -> float:
    """Aggregate tokens/s of HF generate decoding `sequences` copies of one random prompt greedily (as the Hogwild!
    sessions decode), prefill excluded."""
    model = m.model
    prompt = torch.randint(1, model.config.vocab_size, (1, context), device=m.device).expand(sequences, -1)
    clock = StepClock()
    new_tokens = 1 + WARMUP_STEPS + steps
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, streamer=clock, pad_token_id=0,
            )
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
    timed = clock.times[1 + WARMUP_STEPS :]  # times[0]: the prompt; times[1]: after prefill and the first token
    return sequences * (len(timed) - 1) / (timed[-1] - timed[0])


def warm_up(engine: Engine, plan: Plan, graphs: bool) -> None:
    """Compiles kernels and fills allocator pools for every worker count before anything is timed."""
    for workers in plan.workers:
        hogwild_tokens_per_s(engine, WARM_UP_CONTEXT, workers, 1)
        if graphs:
            try:
                hogwild_tokens_per_s(engine, WARM_UP_CONTEXT, workers, 1, graphs=True)
            except RuntimeError as exc:  # the table's graph column says so, row by row
                print(f"  warm-up with CUDA graphs, {workers} workers: {exc}", flush=True)
        hf_tokens_per_s(engine.model, WARM_UP_CONTEXT, workers, 1)


def throughput_table(plan: Plan, dtype: torch.dtype, backend: str) -> str:
    """One row per (context, workers); a row that fails (say, out of memory) says so and the table goes on."""
    m = random_model("qwen3", plan.shape, plan.layers, dtype, plan.device)
    engine = Engine(m, EngineConfig(max_tokens=100_000, cuda_graphs=False))  # each run sets its own
    engine.attention = backend
    graphs = backend == "triton" and plan.device.type == "cuda"  # decode graphs replay Triton launches only
    warm_up(engine, plan, graphs)
    caption = (
        f"Aggregate decode tokens/s, {device_name(plan.device)}, {plan.shape_name} random model with {plan.layers} "
        f"layers, {str(dtype).removeprefix('torch.')}, engine attention '{backend}'; {plan.steps} timed "
        f"decode steps after {WARMUP_STEPS} warm-up steps, prefill excluded; the engine eager and with decode "
        "steps replayed from CUDA graphs (captured in the warm-up). HF: generate of one copy of the prompt per "
        "worker, SDPA attention; both greedy."
    )
    lines = [
        caption,
        "",
        "| context | workers | Hogwild tok/s (vs 1 worker) | Hogwild + CUDA graphs tok/s (vs 1 worker) | "
        "HF generate tok/s (vs 1 sequence) | Hogwild / HF | with graphs / HF |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    deadline = time.perf_counter() + plan.row_budget_s
    for context in plan.contexts:
        base: dict[str, float] = {}
        for workers in plan.workers:
            lines.append(throughput_row(engine, plan, context, workers, base, graphs, deadline))
            print("  " + lines[-1], flush=True)
    return "\n".join(lines)


def throughput_row(
    engine: Engine, plan: Plan, context: int, workers: int, base: dict[str, float], graphs: bool, deadline: float
) -> str:
    """One markdown row; `base` keeps the context's 1-worker results for the speedup columns. No row starts after
    `deadline` (time.perf_counter())."""
    if time.perf_counter() > deadline:
        return f"| {context} | {workers} | skipped (time budget) | | | | |"
    rates: dict[str, float] = {}
    graphs_failure = "n/a"
    try:
        rates["hogwild"] = hogwild_tokens_per_s(engine, context, workers, plan.steps)
        if graphs:
            try:
                rates["graphs"] = hogwild_tokens_per_s(engine, context, workers, plan.steps, graphs=True)
            except RuntimeError as exc:  # the eager and HF columns still count
                graphs_failure = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        rates["hf"] = hf_tokens_per_s(engine.model, context, workers, plan.steps)
    except RuntimeError as exc:  # out of memory included: the other rows still count
        return f"| {context} | {workers} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | | |"
    finally:
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()  # HF's cache of N long sequences is the largest allocation
    if workers == 1:
        base.update(rates)

    def cell(name: str) -> str:
        if name not in rates:
            return graphs_failure
        speedup = f" ({rates[name] / base[name]:.2f}x)" if name in base else ""
        return f"{rates[name]:.1f}{speedup}"

    with_graphs = f"{rates['graphs'] / rates['hf']:.2f}" if "graphs" in rates else "n/a"
    return (
        f"| {context} | {workers} | {cell('hogwild')} | {cell('graphs')} | {cell('hf')} | "
        f"{rates['hogwild'] / rates['hf']:.2f} | {with_graphs} |"
    )


# ---- the run ------------------------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return Plan(
            device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), layers=2, contexts=[64, 200],
            workers=[1, 2], steps=3, shape=TINY, shape_name="tiny Qwen3", check_layouts=2, check_common=150,
            check_tokens=4, row_budget_s=args.budget_s,
        )
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke to check the script on CPU")
    return Plan(
        device=torch.device("cuda"), layers=args.layers, contexts=[1024, 16384, 4096], workers=[1, 2, 4, 8],
        steps=args.steps, shape=QWEN3_8B, shape_name="Qwen3-8B-shaped", check_layouts=8, check_common=3000,
        check_tokens=48, row_budget_s=args.budget_s,
    )


def correctness(plan: Plan) -> tuple[str, bool]:
    kernel, kernel_ok = kernel_check(plan)
    session, session_ok = session_check(plan)
    return f"{kernel}\n\n{session}", kernel_ok and session_ok


def guarded(report: Report, title: str, make: Callable[[], tuple[str, bool]]) -> bool:
    """Adds the section `make` builds; a crash becomes a FAILED section so the next sections still run."""
    try:
        body, ok = make()
    except Exception as exc:  # noqa: BLE001 - the report keeps every section that can still be measured
        traceback.print_exc()
        body, ok = f"FAILED: {type(exc).__name__}: {exc}\n\n```\n{traceback.format_exc(limit=-6)}```", False
    report.add(f"## {title}{'' if ok else ' (FAILED)'}\n\n{body}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device, seconds")
    parser.add_argument("--layers", type=int, default=36, help="decoder layers of the Qwen3-8B-shaped model")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per throughput run")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="seconds into the tokens/s section after which no new row starts")
    parser.add_argument("--no-throughput", action="store_true", help="sections 1 and 2 only (kernel work)")
    args = parser.parse_args()
    plan = make_plan(args)
    register_triton_backend()
    import triton

    report = Report(
        f"# GPU tables: {device_name(plan.device)}\n\ntorch {torch.__version__}, transformers "
        f"{transformers.__version__}, triton {triton.__version__}"
    )
    checked = guarded(report, "1. Correctness", lambda: correctness(plan))
    use_triton = checked and plan.device.type == "cuda"  # a failed check leaves the PyTorch path to measure
    heads = Heads(plan.shape["num_attention_heads"], plan.shape["num_key_value_heads"], plan.shape["head_dim"])
    with torch.inference_mode():
        guarded(report, "2. Attention per layer", lambda: (attention_table(
            plan.contexts, plan.workers, heads, torch.bfloat16, plan.device, include_triton=use_triton), True))
        if not args.no_throughput:
            guarded(report, "3. Aggregate tokens/s", lambda: (throughput_table(
                plan, torch.bfloat16, "triton" if use_triton else "torch"), True))
    if not checked:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
