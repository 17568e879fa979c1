"""What one batched forward computes: which tokens are written where, and what each token attends to.

A forward packs the new tokens of every running session into one row (no padding). Each session contributes
`Run`s: tokens appended to one block, all seeing the same view. A view lists the blocks a token attends to, in
view order, with how many of their tokens it sees; the token's own block comes last and is seen causally.
Everything position-dependent (rotation angles, masks, write indices) is built here once per forward and shared
by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from engine.cache import SessionCache
from engine.rope import cos_sin

View = tuple[tuple[int, int], ...]  # ((block, visible length), ...) in view order, own block excluded


@dataclass(frozen=True)
class Run:
    """`token_ids` appended to `block` from position `start`, each token seeing `view` then its own block."""

    block: int
    start: int
    token_ids: tuple[int, ...]
    view: View
    want_logits: bool = False  # the last token's next-token logits are needed


@dataclass
class GroupPlan:
    """One session's share of a forward, as tensors on the model's device.

    Invariant: for token i and block b, keys 0..vis[i, b]-1 of b are visible, at view positions off(i, b)+j;
    the query, rotated by the model at its block-local position, is rotated further by delta[i, b] =
    off(i, own) - off(i, b) to score block b.
    """

    rows: slice  # this session's tokens in the packed row
    cache: SessionCache
    common_len: int  # keys of block 0 any token sees
    small_len: int  # keys of any small block any token sees
    cos: torch.Tensor  # (1 + Bs, 1, 1, n, D)
    sin: torch.Tensor  # (1 + Bs, 1, 1, n, D)
    common_rows: torch.Tensor  # (nc,) token index within the group, written to block 0
    common_pos: torch.Tensor  # (nc,)
    small_rows: torch.Tensor  # (ns,)
    small_block: torch.Tensor  # (ns,) small-block index (block - 1)
    small_pos: torch.Tensor  # (ns,)
    vis: torch.Tensor  # (n, 1 + Bs) long, on the device
    offset: torch.Tensor  # (n, 1 + Bs) long view offsets, on the host: only the reference attention reads them
    own: torch.Tensor  # (n,) long: the block each token is written to, on the host likewise

    @property
    def is_prompt(self) -> bool:
        """Every token is written to the common block and sees only it (prompt prefill): no block needs a
        rotation (delta 0), so this is ordinary causal attention over the common block."""
        return self.small_len == 0

    @cached_property
    def visible_common(self) -> torch.Tensor:
        """(n, common_len) bool: which common-block keys each token sees; built on the device on first use."""
        return torch.arange(self.common_len, device=self.vis.device)[None] < self.vis[:, :1]

    @cached_property
    def mask(self) -> torch.Tensor:
        """(n, common_len + Bs * small_len) float32 additive mask, 0 visible and -inf hidden; built on the
        device on first use (only the PyTorch path reads it)."""
        vis = self.vis
        small = torch.arange(self.small_len, device=vis.device)[None, None] < vis[:, 1:, None]  # (n, Bs, S)
        visible = torch.cat([self.visible_common, small.flatten(1)], dim=1)
        return torch.zeros(visible.shape, device=vis.device).masked_fill_(~visible, float("-inf"))


@dataclass
class ForwardPlan:
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N) block-local positions
    logit_rows: torch.Tensor  # (K,) packed indices whose logits are returned, in request order
    groups: list[GroupPlan] = field(default_factory=list)
    attention: str = "torch"  # a name in engine.attention.BACKENDS


def _run_tables(run: Run, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (offset, vis) tables of one run, each (n, num_blocks)."""
    n = len(run.token_ids)
    vis = torch.zeros(num_blocks, dtype=torch.long)
    offset = torch.zeros(num_blocks, dtype=torch.long)
    position = 0
    for block, length in run.view:
        assert block != run.block, "a run's own block is seen causally, last"
        vis[block], offset[block] = length, position
        position += length
    offset[run.block] = position
    vis = vis.expand(n, -1).clone()
    vis[:, run.block] = torch.arange(run.start + 1, run.start + n + 1)
    return offset.expand(n, -1).clone(), vis


def reserve_runs(cache: SessionCache, runs: list[Run]) -> None:
    """Grows `cache` so every run's block holds the tokens it writes (nothing to do when they fit). The engine
    calls this per session before building a forward, so a session whose cache cannot grow fails alone."""
    for run in runs:
        cache.reserve(run.block, run.start + len(run.token_ids))


def build_group(
    runs: list[Run], cache: SessionCache, rows: slice, inv_freq: torch.Tensor, dtype: torch.dtype
) -> GroupPlan:
    """Turns one session's runs into tensors and reserves cache room for the tokens they write."""
    device = cache.common_k.device
    tables = [_run_tables(run, cache.num_blocks) for run in runs]
    offset = torch.cat([t[0] for t in tables])  # (n, B)
    vis = torch.cat([t[1] for t in tables])  # (n, B)
    blocks = torch.cat([torch.full((len(r.token_ids),), r.block) for r in runs])  # (n,)
    own_offset = offset.gather(1, blocks[:, None])  # (n, 1)
    delta = torch.where(vis > 0, own_offset - offset, 0)  # (n, B)
    positions = torch.cat([torch.arange(r.start, r.start + len(r.token_ids)) for r in runs])
    reserve_runs(cache, runs)
    for run in runs:
        cache.lengths[run.block] = max(cache.lengths[run.block], run.start + len(run.token_ids))
    common_len = int(vis[:, 0].max())
    small_len = int(vis[:, 1:].max()) if vis.shape[1] > 1 else 0
    if common_len > cache.common_k.shape[2] or small_len > cache.small_k.shape[3]:  # kernels read what views say
        raise ValueError(f"a view ({common_len} common, {small_len} small keys) reaches past the session's cache")
    is_common = blocks == 0
    # Every integer table the device needs travels in one host-to-device copy per group, then is cut into views.
    tables = (
        vis, delta.T, is_common.nonzero().flatten(), positions[is_common], (~is_common).nonzero().flatten(),
        blocks[~is_common] - 1, positions[~is_common],
    )
    packed = torch.cat([t.flatten() for t in tables]).to(device).split([t.numel() for t in tables])
    vis_d, delta_d, common_rows, common_pos, small_rows, small_block, small_pos = (
        part.view(t.shape) for part, t in zip(packed, tables, strict=True)
    )
    cos, sin = cos_sin(delta_d, inv_freq, dtype)  # (B, n, D)
    return GroupPlan(
        rows=rows,
        cache=cache,
        common_len=common_len,
        small_len=small_len,
        cos=cos[:, None, None],
        sin=sin[:, None, None],
        common_rows=common_rows,
        common_pos=common_pos,
        small_rows=small_rows,
        small_block=small_block,
        small_pos=small_pos,
        vis=vis_d,
        offset=offset,
        own=blocks,
    )


def build_forward(
    session_runs: list[tuple[SessionCache, list[Run]]],
    inv_freq: torch.Tensor,
    dtype: torch.dtype,
    attention: str = "torch",
) -> ForwardPlan:
    """Packs every session's runs into one row. logit_rows follow the order of runs with want_logits.

    Groups are attended in order, so a prompt group writes the common block before the group after it reads it.
    """
    token_ids: list[int] = []
    positions: list[int] = []
    logit_rows: list[int] = []
    groups: list[GroupPlan] = []
    for cache, runs in session_runs:
        # Leading prompt runs (common block, nothing else in view) form a group of their own, so a prompt chunk
        # takes the causal path (GroupPlan.is_prompt) even when labels and first steps share its forward.
        split = next((i for i, run in enumerate(runs) if run.block != 0 or run.view), len(runs))
        for part in (runs[:split], runs[split:]):
            if not part:
                continue
            first = len(token_ids)
            for run in part:
                token_ids.extend(run.token_ids)
                positions.extend(range(run.start, run.start + len(run.token_ids)))
                if run.want_logits:
                    logit_rows.append(len(token_ids) - 1)
            groups.append(build_group(part, cache, slice(first, len(token_ids)), inv_freq, dtype))
    device = groups[0].cache.common_k.device
    return ForwardPlan(
        input_ids=torch.tensor([token_ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        logit_rows=torch.tensor(logit_rows, device=device, dtype=torch.long),
        groups=groups,
        attention=attention,
    )
