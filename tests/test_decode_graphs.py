"""Decode steps replayed from graphs: static plans over whole capacities, keys, the first-replay check, fallback.

On CPU a stand-in "graph" reruns the forward on the graph's static plan, so everything but the CUDA recording is
exercised: tables refilled in place, attention over whole block capacities through the Triton kernel (in Triton's
interpreter), capture on a repeated key, the check against the eager forward. With a GPU the real CUDA capture
is tested too.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from triton_mode import triton_device

DEVICE = triton_device()
pytest.importorskip("triton", reason="Triton is not installed; decode graphs run the Triton attention")

from engine import attention  # noqa: E402
from engine.cache import SessionCache  # noqa: E402
from engine.config import EngineConfig, SamplingParams, SessionRequest  # noqa: E402
from engine.decode_graphs import DecodeGraphs, Forward, graphable, plan_key, static_plan  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.events import TokenEvent  # noqa: E402
from engine.plan import ForwardPlan, Run, build_forward  # noqa: E402
from engine.triton_attention import triton_group_attention  # noqa: E402

REQUEST = SessionRequest(
    prompt="Count to five, then name three colours.", num_workers=2, max_tokens=8,
    sampling=SamplingParams(temperature=0.0), redundancy_check_every=0, final_answer=False,
)


class Rerun:
    """A graph stand-in: each replay runs the forward again on the captured static plan, into the same output."""

    def __init__(self, forward: Forward, static: ForwardPlan, logits: torch.Tensor) -> None:
        self.forward, self.static, self.logits = forward, static, logits

    def replay(self) -> None:
        self.logits.copy_(self.forward(self.static))


def rerun_capture(forward: Forward, static: ForwardPlan) -> tuple[Rerun, torch.Tensor]:
    logits = forward(static).clone()
    return Rerun(forward, static, logits), logits


Tokens = list[tuple[int, tuple[int, ...]]]


def session_tokens(engine: Engine) -> Tokens:
    return [(e.worker, e.token_ids) for e in engine.generate(REQUEST) if isinstance(e, TokenEvent)]


@pytest.fixture(scope="module")
def engine_and_eager(tiny_model_factory: Callable[..., Path]) -> Iterator[tuple[Engine, Tokens]]:
    """An engine on the Triton attention, and its session's tokens without graphs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(attention.BACKENDS, "triton", triton_group_attention)
        path = tiny_model_factory("llama", head_dim=64)
        engine = Engine.load(EngineConfig(
            model=str(path), device=DEVICE, dtype="float32", prefix_cache_tokens=0, cuda_graphs=False
        ))
        engine.attention = "triton"
        yield engine, session_tokens(engine)


@pytest.fixture
def engine(engine_and_eager: tuple[Engine, Tokens]) -> Iterator[Engine]:
    engine = engine_and_eager[0]
    yield engine
    engine.graphs = None


@pytest.fixture
def eager(engine_and_eager: tuple[Engine, Tokens]) -> Tokens:
    return engine_and_eager[1]


def test_replayed_decode_steps_give_the_same_session(
    engine: Engine, eager: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    assert eager, "the session should sample tokens"
    engine.graphs = graphs = DecodeGraphs(engine.forward_logits, capture=rerun_capture)
    with caplog.at_level(logging.INFO, logger="engine.decode_graphs"):
        assert session_tokens(engine) == eager
    assert graphs.enabled and graphs.captures >= 1 and graphs.replays >= 4
    announced = [r for r in caplog.records if r.levelno == logging.INFO and "captured a decode step" in r.message]
    assert len(announced) == 1, "the first capture is announced, later ones only at debug level"


def test_a_replay_that_disagrees_with_the_eager_forward_turns_graphs_off(engine: Engine, eager: Tokens) -> None:
    def wrong_capture(forward: Forward, static: ForwardPlan) -> tuple[Rerun, torch.Tensor]:
        graph, logits = rerun_capture(forward, static)
        graph.forward = lambda plan: torch.zeros_like(logits)  # replays that compute something else
        return graph, logits

    engine.graphs = graphs = DecodeGraphs(engine.forward_logits, capture=wrong_capture)
    assert session_tokens(engine) == eager
    assert not graphs.enabled and graphs.replays == 0


def test_a_failing_capture_turns_graphs_off(engine: Engine, eager: Tokens, caplog: pytest.LogCaptureFixture) -> None:
    def failing_capture(forward: Forward, static: ForwardPlan) -> tuple[Rerun, torch.Tensor]:
        raise RuntimeError("operation not permitted when stream is capturing")

    engine.graphs = graphs = DecodeGraphs(engine.forward_logits, capture=failing_capture)
    with caplog.at_level(logging.WARNING, logger="engine.decode_graphs"):
        assert session_tokens(engine) == eager
    assert not graphs.enabled
    assert any("run eagerly from now on" in r.message for r in caplog.records if r.levelno == logging.WARNING)


def decode_plan(cache: SessionCache, step: int) -> ForwardPlan:
    """Two workers appending their `step`-th token to blocks 1 and 2, each seeing the common block and the other."""
    runs = [
        Run(1, step, (5,), ((0, cache.lengths[0]), (2, step)), want_logits=True),
        Run(2, step, (6,), ((0, cache.lengths[0]), (1, step)), want_logits=True),
    ]
    return build_forward([(cache, runs)], torch.ones(32), torch.float32, "triton")


def test_keys_hold_across_growing_views_and_change_when_a_cache_grows() -> None:
    cache = SessionCache(1, 2, 64, 2, torch.float32, torch.device("cpu"), common_capacity=40, small_capacity=16)
    cache.lengths = [30, 0, 0]
    first, second = decode_plan(cache, 3), decode_plan(cache, 4)
    assert graphable(first)
    key = plan_key(first)
    assert plan_key(second) == key  # one more key seen by each worker: same graph
    static = static_plan(first)
    assert static.groups[0].common_len == cache.common_k.shape[2] > 30
    assert static.groups[0].small_len == cache.small_k.shape[3] > 4  # whole capacities, not current lengths
    assert static.groups[0].vis.data_ptr() != first.groups[0].vis.data_ptr()  # the graph owns its inputs
    cache.reserve(1, 300)  # the small blocks outgrow their capacity: new tensors, new key
    assert plan_key(decode_plan(cache, 5)) != key
    prefill = build_forward([(cache, [Run(0, 30, (1, 2), ())])], torch.ones(32), torch.float32, "triton")
    assert not graphable(prefill)  # prompt chunks run eagerly


class Recorded:
    """A graph stand-in that, like a CUDA graph, keeps no Python reference to what it was captured over."""

    def replay(self) -> None:
        pass


def test_a_graph_keeps_no_session_cache_alive() -> None:
    """A graph outliving its sessions must not hold their KV memory: it keeps only its own input tables."""
    cache = SessionCache(1, 2, 64, 2, torch.float32, torch.device("cpu"), common_capacity=40, small_capacity=16)
    cache.lengths = [30, 0, 0]
    tensors = [weakref.ref(t) for t in (cache.common_k, cache.common_v, cache.small_k, cache.small_v)]
    graphs = DecodeGraphs(lambda plan: torch.zeros(plan.logit_rows.numel(), 8),
                          capture=lambda forward, static: (Recorded(), forward(static)))
    for step in (3, 4, 5):  # eager, captured, replayed
        graphs(decode_plan(cache, step))
    assert graphs.captures == 1 and graphs.replays == 1
    del cache
    gc.collect()
    assert all(ref() is None for ref in tensors), "the session's cache outlived it inside a graph entry"


@pytest.mark.gpu
def test_an_engine_configured_for_cuda_graphs_replays_them_to_the_same_session(
    engine_and_eager: tuple[Engine, Tokens],
) -> None:
    loaded, eager = engine_and_eager
    engine = Engine(loaded.model, EngineConfig(cuda_graphs=True, prefix_cache_tokens=0))
    assert engine.attention == "triton"
    graphs = engine.graphs
    assert graphs is not None, "cuda_graphs on a CUDA device with the Triton attention sets up decode graphs"
    assert session_tokens(engine) == eager
    assert graphs.enabled and graphs.captures >= 1 and graphs.replays >= 4


@pytest.mark.gpu
def test_decode_graphs_are_on_by_default_on_a_cuda_device_and_off_when_turned_off(
    engine_and_eager: tuple[Engine, Tokens],
) -> None:
    loaded, eager = engine_and_eager
    assert Engine(loaded.model, EngineConfig(prefix_cache_tokens=0)).graphs is not None
    engine = Engine(loaded.model, EngineConfig(cuda_graphs=False, prefix_cache_tokens=0))
    assert engine.graphs is None
    assert session_tokens(engine) == eager
