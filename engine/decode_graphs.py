"""Decode forwards replayed from CUDA graphs, for steps whose shapes repeat.

On a GPU a decode step launches some forty small kernels per layer (norms, projections, rotations, the Triton
attention), and launching them from Python costs far more than running them: the step is bound by the host. A
CUDA graph records one forward's launches once and replays them with one call.

A graph replays fixed shapes at fixed addresses, so:
- Each graph owns a static copy of the plan (`static_plan`): token ids, positions, rotations, visibility and
  write positions, refilled in place before every replay. Everything else a step varies is in those values.
- The attention is told each block's whole capacity instead of its current length (the Triton kernel stops at
  the keys each row sees, so the extra length costs nothing but idle programs). A view that grows by a token
  per step therefore keeps its graph.
- A graph is keyed by the sessions' rows, their blocks and their cache tensors (addresses and capacities). A
  session joining or leaving, or a cache growing, makes a new key: that step runs eagerly, and a key seen on
  two consecutive steps is captured.

Every capture is checked: its first replay must reproduce the eager forward of the same step, or graphs are
turned off for this engine with a warning. Prefill steps (prompt chunks) always run eagerly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.plan import ForwardPlan

log = logging.getLogger(__name__)

MAX_GRAPHS = 4  # captured batch shapes kept at once, least recently used dropped first
CHECK_RTOL = 1e-2  # a first replay may differ from the eager forward by this share of the largest logit

Forward = Callable[[ForwardPlan], torch.Tensor]  # plan -> logits (K, V)


class Replayable(Protocol):
    def replay(self) -> None: ...


Capture = Callable[[Forward, ForwardPlan], tuple[Replayable, torch.Tensor]]  # -> graph, its output logits


def graphable(plan: ForwardPlan) -> bool:
    """A decode step on the Triton attention: no prompt chunk (their causal path reads exact lengths)."""
    return plan.attention == "triton" and all(not group.is_prompt for group in plan.groups)


def plan_key(plan: ForwardPlan) -> Hashable:
    """Everything a replay cannot change: rows, table shapes, and each session's cache tensors."""
    groups = tuple(
        (
            group.rows.start, group.rows.stop, tuple(group.vis.shape), group.common_rows.numel(),
            group.small_rows.numel(),
            *(
                (tensor.data_ptr(), tuple(tensor.shape))
                for tensor in (group.cache.common_k, group.cache.common_v, group.cache.small_k, group.cache.small_v)
            ),
        )
        for group in plan.groups
    )
    return plan.input_ids.shape[1], plan.logit_rows.numel(), groups


def static_plan(plan: ForwardPlan) -> ForwardPlan:
    """A copy of `plan` with tensors of its own (a graph's inputs) that attends over whole block capacities."""
    groups = [
        dataclasses.replace(
            group,
            common_len=group.cache.common_k.shape[2],
            small_len=group.cache.small_k.shape[3],
            **{name: getattr(group, name).clone() for name in _GROUP_INPUTS},
        )
        for group in plan.groups
    ]
    return dataclasses.replace(plan, groups=groups, **{name: getattr(plan, name).clone() for name in _PLAN_INPUTS})


def inputs(plan: ForwardPlan) -> list[torch.Tensor]:
    """The plan's tables a replay reads, in a fixed order: what a graph keeps of its static plan."""
    tables = [getattr(plan, name) for name in _PLAN_INPUTS]
    for group in plan.groups:
        tables.extend(getattr(group, name) for name in _GROUP_INPUTS)
    return tables


def load(static_inputs: list[torch.Tensor], plan: ForwardPlan) -> None:
    """Copies `plan`'s tables into a graph's input tensors (same key, so the same shapes)."""
    for target, source in zip(static_inputs, inputs(plan), strict=True):
        target.copy_(source)


_PLAN_INPUTS = ("input_ids", "position_ids", "logit_rows")
_GROUP_INPUTS = ("cos", "sin", "vis", "common_rows", "common_pos", "small_rows", "small_block", "small_pos")


def cuda_capture(forward: Forward, static: ForwardPlan) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Records `forward(static)` in a CUDA graph. A forward rewrites the same keys/values each time it runs with
    the same tables, so the warm-up run before the capture changes nothing the replay would not."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: kernels compiled, libraries initialised
        forward(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = forward(static)
    return graph, logits


@dataclass
class _Graph:
    inputs: list[torch.Tensor]  # the static plan's tables, refilled before each replay; not the plan itself, which
    # would keep its sessions' caches alive after they end (the graph only holds their addresses)
    graph: Replayable
    logits: torch.Tensor  # written by each replay


class DecodeGraphs:
    """Runs a step's forward from a captured graph when its key has one, else eagerly (capturing repeat keys)."""

    def __init__(self, forward: Forward, capture: Capture = cuda_capture, max_graphs: int = MAX_GRAPHS) -> None:
        self._forward = forward
        self._capture = capture
        self._max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._last_key: Hashable | None = None
        self.enabled = True
        self.replays = 0
        self.captures = 0

    def __call__(self, plan: ForwardPlan) -> torch.Tensor:
        """The logits (K, V) of `plan`'s forward."""
        if not self.enabled or not graphable(plan):
            return self._forward(plan)
        key = plan_key(plan)
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            load(entry.inputs, plan)
            entry.graph.replay()
            self.replays += 1
            return entry.logits
        if key != self._last_key:  # a shape seen once may never come back: run it eagerly
            self._last_key = key
            return self._forward(plan)
        return self._capture_and_check(key, plan)

    def _capture_and_check(self, key: Hashable, plan: ForwardPlan) -> torch.Tensor:
        static = static_plan(plan)
        expected = self._forward(static)  # this step's logits, computed as the replays will compute them
        try:
            graph, logits = self._capture(self._forward, static)
            graph.replay()
        except Exception:
            log.warning("capturing a decode step failed; decode steps run eagerly from now on", exc_info=True)
            self.enabled = False
            return expected
        error = float((logits.float() - expected.float()).abs().max())
        bound = CHECK_RTOL * float(expected.float().abs().max())
        if not error <= bound:  # NaN fails too
            log.warning("a captured decode step replayed %.3g off the eager forward (allowed %.3g); decode steps "
                        "run eagerly from now on", error, bound)
            self.enabled = False
            return expected
        self._graphs[key] = _Graph(inputs(static), graph, logits)
        self.captures += 1
        # The first capture says graphs work on this GPU; later ones follow sessions joining, leaving or growing.
        log.log(logging.INFO if self.captures == 1 else logging.DEBUG,
                "captured a decode step of %d tokens in a CUDA graph (%d captures so far)",
                plan.input_ids.shape[1], self.captures)
        while len(self._graphs) > self._max_graphs:
            self._graphs.popitem(last=False)
        return expected
