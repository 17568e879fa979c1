"""Hogwild! attention as Triton kernels, flash-decoding style: the GPU twin of `fast_group_attention`.

Same signature and result as engine.attention.fast_group_attention: q (Hq, n, D) rotated by the model at
block-local positions -> attention output (Hq, n, D) over the session's cache, one softmax over every block of
each token's view.

How the work is cut:
- Query rows. For KV head h the G = Hq / Hkv query heads of all n tokens form R = G * n rows (row r = g * n + i:
  head h * G + g, token i), the layout of `q.view(Hkv, G * n, D)`. One program takes a tile of BLOCK_M rows, so
  every key/value tile it loads serves all query heads of that KV head and every worker's token at once: the
  common block is read once per KV head, not once per worker.
- Keys. Every block is cut into chunks of `chunk_keys` keys; one program scores one chunk of one block
  (flash-decoding split), rotating its query rows once by that block's delta (cos/sin from the plan), and
  writes a partial (out, lse) with an online softmax in float32. Keys j < vis[i, b] of block b are visible to
  token i; everything else is masked.
- Merge. The partials of every chunk of every block are combined by log-sum-exp, either by a kernel of its own
  (MERGE_IN_CHUNKS = 0) or by the chunk program that finishes last for its row tile and KV head
  (MERGE_IN_CHUNKS = 1): every chunk program counts itself in an atomic counter once its partial is stored, and
  the one that completes the count merges, saving a launch. Which is faster is a launch parameter for
  bench/tune_triton.py to decide on each GPU kind.

The common block and the small blocks live in two tensors. One launch of the chunk kernel covers both (ONE_LAUNCH
= 1: the programs after the common block's chunks take the small blocks' chunks, with that tensor's base and
strides), or each gets a launch of its own; either way all write into one table of partials. Importing this module
raises ImportError when Triton is missing; otherwise it only defines the kernels (compiled on first launch).
Triton fixes its mode when it is first imported: set TRITON_INTERPRET=1 before that to run these kernels on CPU
tensors in Triton's interpreter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the PyTorch path serves machines without Triton
    message = "the Triton attention needs the 'triton' package (from a checkout: pip install -e '.[gpu]')"
    raise ImportError(message) from exc

from engine.attention import TRITON_HEAD_DIMS as SUPPORTED_HEAD_DIMS
from engine.errors import UnsupportedModelError
from engine.plan import GroupPlan

# Launch parameters, read at every call. Values: bench/tune_triton.py's sweep on an H200 (bf16, 32/8 heads of
# 128, decode at 1k-16k context), which cut a 16k-context 4-worker layer from 2.9x to 1.27x SDPA's time.
BLOCK_N = 128  # keys per tile
CHUNK_WARPS = 4  # warps per chunk program
MERGE_ROWS = 16  # query rows per merge program
MERGE_DIMS = 16  # head-dim columns per merge program: a decode step has few rows, so columns spread the merge
MIN_CHUNK_TILES = 1  # a chunk holds at least this many key tiles before the key range is split further
PROGRAMS_PER_SM = 1  # chunk programs aimed at per multiprocessor when splitting keys
MERGE_IN_CHUNKS = 0  # 1: the last chunk program of each row tile and KV head merges (no merge launch)
ONE_DOT = 1  # 1: scores as one dot of depth D per key tile (the query rotated whole), 0: two dots of depth D/2
ONE_LAUNCH = 1  # 1: one chunk launch over the common and the small blocks, 0: a launch for each
INTERPRETER_PROGRAMS = 16  # the same aim on the CPU interpreter (no multiprocessors to count)
STAGES = {torch.float32: 1}  # software-pipeline depth: float32 tiles fit every GPU's shared memory only unpipelined
DEFAULT_STAGES = 3
LOG2_E = math.log2(math.e)
# Arguments that change from call to call: left unspecialised, so one compiled kernel serves every session.
_CHUNK_RUNTIME_ARGS = ["stride_vn", "stride_lc", "stride_lh", "stride_fr", "n", "first_block", "block_len",
                       "chunks_per_block", "first_chunk", "num_chunks", "first_block2", "block_len2",
                       "chunks_per_block2", "split"]
_MERGE_RUNTIME_ARGS = ["stride_lc", "stride_lh", "num_rows", "num_chunks"]


@triton.jit(do_not_specialize=_CHUNK_RUNTIME_ARGS)
def _chunk_kernel(
    q_ptr, cos_ptr, sin_ptr, vis_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    final_ptr, count_ptr,  # MERGE only: the output (Hkv, R, D) and one int32 counter per (row tile, KV head)
    k2_ptr, v2_ptr,  # BOTH only: the second cache tensor, read by programs from `split` on
    stride_qh, stride_qn,  # q (Hq, n, D), unit stride on D
    stride_cb, stride_cn,  # cos / sin (1 + Bs, n, D): the per-block query rotation of each token
    stride_vn, stride_vb,  # vis (n, 1 + Bs) int64
    stride_kb, stride_kh, stride_kn,  # k and v (num_blocks, Hkv, capacity, D), same strides
    stride_k2b, stride_k2h,  # k2 and v2, BOTH only (same stride_kn)
    stride_oc, stride_oh, stride_or,  # partial out (C, Hkv, R, D) float32
    stride_lc, stride_lh,  # partial lse (C, Hkv, R) float32, log base 2
    stride_fh, stride_fr,  # output (Hkv, R, D), MERGE only
    n, num_groups, first_block, block_len, chunk_keys, chunks_per_block, first_chunk, num_chunks, qk_scale,
    first_block2, block_len2, chunk_keys2, chunks_per_block2, split,  # BOTH only: the second tensor's blocks
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MERGE: tl.constexpr, ONE_DOT: tl.constexpr, BOTH: tl.constexpr,
):
    """Grid (row tiles, Hkv, num_blocks * chunks_per_block, plus the second tensor's with BOTH): one chunk of one
    block for BLOCK_M query rows.

    Writes out = softmax-weighted values over the chunk's visible keys and lse = log2 of the softmax
    denominator (qk already in log2 units); a row that sees no key of the chunk gets out 0 and lse -inf.
    With MERGE, the program that stores the last of the `num_chunks` partials of its row tile and KV head (over
    every launch of the call) merges them into final_ptr and resets their counter for the next call.
    With BOTH, one launch covers two cache tensors: programs from `split` on take the chunks of the second.
    """
    tile, h, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    chunk = first_chunk + pid_c  # this program's partial
    if BOTH:  # noqa: SIM102 - a compile-time branch around a run-time one
        if pid_c >= split:
            pid_c -= split
            k_ptr, v_ptr, stride_kb, stride_kh = k2_ptr, v2_ptr, stride_k2b, stride_k2h
            first_block, block_len, chunk_keys = first_block2, block_len2, chunk_keys2
            chunks_per_block = chunks_per_block2
    block = pid_c // chunks_per_block  # within this program's tensor
    start = (pid_c % chunks_per_block) * chunk_keys
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    is_row = rows < num_groups * n
    token = rows % n
    head = h * num_groups + rows // n
    vis_at = vis_ptr + token * stride_vn + (first_block + block) * stride_vb
    vis = tl.load(vis_at, mask=is_row, other=0).to(tl.int32)  # (BM,) visible keys of this block per row
    end = tl.minimum(tl.minimum(start + chunk_keys, block_len), tl.max(vis, axis=0))

    # The query rows, rotated from the token's own frame into this block's frame.
    d = tl.arange(0, HALF)
    dv = tl.arange(0, 2 * HALF)
    q_rows = q_ptr + head * stride_qh + token * stride_qn
    angle = (first_block + block) * stride_cb + token * stride_cn
    if ONE_DOT:  # r = q cos + rotate_half(q) sin over the whole head: one dot of depth D per key tile
        partner = (dv + HALF) % (2 * HALF)  # rotate_half(q)[j] = -q[j + D/2] for j < D/2, q[j - D/2] after
        sign = tl.where(dv < HALF, -1.0, 1.0)
        q = tl.load(q_rows[:, None] + dv[None, :], mask=is_row[:, None], other=0.0).to(tl.float32)  # (BM, D)
        q_half = tl.load(q_rows[:, None] + partner[None, :], mask=is_row[:, None], other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + angle[:, None] + dv[None, :], mask=is_row[:, None], other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + angle[:, None] + dv[None, :], mask=is_row[:, None], other=0.0).to(tl.float32)
        r = (q * cos + sign[None, :] * q_half * sin).to(k_ptr.dtype.element_ty)  # rounded like the keys
    else:  # the two halves of the rotation, one dot of depth D/2 each
        q1 = tl.load(q_rows[:, None] + d[None, :], mask=is_row[:, None], other=0.0).to(tl.float32)  # (BM, HALF)
        q2 = tl.load(q_rows[:, None] + HALF + d[None, :], mask=is_row[:, None], other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + angle[:, None] + d[None, :], mask=is_row[:, None], other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + angle[:, None] + d[None, :], mask=is_row[:, None], other=0.0).to(tl.float32)
        r1 = (q1 * cos - q2 * sin).to(k_ptr.dtype.element_ty)  # (BM, HALF), rounded like the keys for the dot
        r2 = (q2 * cos + q1 * sin).to(k_ptr.dtype.element_ty)

    k_base = k_ptr + block * stride_kb + h * stride_kh
    v_base = v_ptr + block * stride_kb + h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of qk (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, 2 * HALF], tl.float32)
    for key0 in range(start, end, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)  # (BN,)
        is_key = keys < end
        if ONE_DOT:
            k = tl.load(k_base + keys[None, :] * stride_kn + dv[:, None], mask=is_key[None, :], other=0.0)  # (D, BN)
            qk = tl.dot(r, k, input_precision=DOT_PRECISION)
        else:
            k1 = tl.load(k_base + keys[None, :] * stride_kn + d[:, None], mask=is_key[None, :], other=0.0)  # (HALF, BN)
            k2 = tl.load(k_base + keys[None, :] * stride_kn + HALF + d[:, None], mask=is_key[None, :], other=0.0)
            qk = tl.dot(r2, k2, tl.dot(r1, k1, input_precision=DOT_PRECISION), input_precision=DOT_PRECISION)
        qk = tl.where(keys[None, :] < vis[:, None], qk * qk_scale, float("-inf"))  # (BM, BN)
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])  # (BM, BN)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_kn + dv[None, :], mask=is_key[:, None], other=0.0)  # (BN, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    out_rows = out_ptr + chunk * stride_oc + h * stride_oh + rows * stride_or
    tl.store(out_rows[:, None] + dv[None, :], out, mask=is_row[:, None])
    tl.store(lse_ptr + chunk * stride_lc + h * stride_lh + rows, lse, mask=is_row)
    if MERGE:
        tl.debug_barrier()  # every thread's part of the partial is stored before the program counts itself
        counter = count_ptr + tile * tl.num_programs(1) + h
        # acq_rel at GPU scope: this program's partial is released to the merger, and the merger acquires all.
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_chunks - 1:
            tl.store(counter, 0)
            _merge_rows(out_ptr, lse_ptr, final_ptr, stride_oc, stride_oh, stride_or, stride_lc, stride_lh,
                        stride_fh, stride_fr, h, rows, is_row, dv, num_chunks)


@triton.jit
def _merge_rows(
    part_ptr, lse_ptr, out_ptr, stride_pc, stride_ph, stride_pr, stride_lc, stride_lh, stride_oh, stride_or,
    h, rows, is_row, d, num_chunks,
):
    """out[h, rows, d] = sum_c 2^(lse_c - M) part_c / sum_c 2^(lse_c - M), M = max_c lse_c.

    Every row sees at least its own token, so some chunk has a finite lse and M is finite. The partials are
    read past the multiprocessor's L1 cache (.cg): other programs wrote them during this launch.
    """
    lse_rows = lse_ptr + h * stride_lh + rows
    top = tl.full(rows.shape, float("-inf"), tl.float32)
    for chunk in range(num_chunks):
        lse = tl.load(lse_rows + chunk * stride_lc, mask=is_row, other=float("-inf"), cache_modifier=".cg")
        top = tl.maximum(top, lse)
    top = tl.where(is_row, top, 0.0)
    part_rows = part_ptr + h * stride_ph + rows[:, None] * stride_pr + d[None, :]  # (rows, d)
    denominator = tl.zeros(rows.shape, tl.float32)
    acc = tl.zeros([rows.shape[0], d.shape[0]], tl.float32)
    for chunk in range(num_chunks):
        lse = tl.load(lse_rows + chunk * stride_lc, mask=is_row, other=float("-inf"), cache_modifier=".cg")
        weight = tl.exp2(lse - top)  # (rows,)
        denominator += weight
        part = tl.load(part_rows + chunk * stride_pc, mask=is_row[:, None], other=0.0, cache_modifier=".cg")
        acc += weight[:, None] * part
    out = acc / tl.where(is_row, denominator, 1.0)[:, None]
    tl.store(out_ptr + h * stride_oh + rows[:, None] * stride_or + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=is_row[:, None])


@triton.jit(do_not_specialize=_MERGE_RUNTIME_ARGS)
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pc, stride_ph, stride_pr,  # partial out (C, Hkv, R, D) float32
    stride_lc, stride_lh,  # partial lse (C, Hkv, R) float32, log base 2
    stride_oh, stride_or,  # out (Hkv, R, D) in the model dtype
    num_rows, num_chunks,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (row tiles, Hkv, D / BLOCK_D): the merge (_merge_rows) as a launch of its own."""
    tile, h, cols = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    d = cols * BLOCK_D + tl.arange(0, BLOCK_D)
    _merge_rows(part_ptr, lse_ptr, out_ptr, stride_pc, stride_ph, stride_pr, stride_lc, stride_lh, stride_oh,
                stride_or, h, rows, rows < num_rows, d, num_chunks)


@dataclass(frozen=True)
class _KeyBlocks:
    """One launch of the chunk kernel: `num_blocks` blocks of one cache tensor, `length` keys each at most."""

    k: torch.Tensor  # (num_blocks, Hkv, capacity, D)
    v: torch.Tensor  # (num_blocks, Hkv, capacity, D)
    first_block: int  # column of the first block in the plan's vis / cos / sin
    length: int
    chunk_keys: int

    @property
    def num_chunks(self) -> int:
        return self.k.shape[0] * triton.cdiv(self.length, self.chunk_keys)


def _chunk_keys(length: int, programs_per_chunk: int, target_programs: int) -> int:
    """Keys per chunk: enough chunks to reach `target_programs`, none shorter than MIN_CHUNK_TILES tiles."""
    tiles = triton.cdiv(length, BLOCK_N)
    wanted = triton.cdiv(target_programs, programs_per_chunk)
    num_chunks = max(1, min(wanted, tiles // MIN_CHUNK_TILES))
    return triton.cdiv(tiles, num_chunks) * BLOCK_N


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _multiprocessors(device)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_group_attention(
    group: GroupPlan,
    layer: int,
    q: torch.Tensor,  # (Hq, n, D)
    scale: float,
    inv_freq: torch.Tensor,
    *,
    chunk_keys: int | None = None,
) -> torch.Tensor:
    """q (Hq, n, D) -> attention output (Hq, n, D) over the session's cache, like fast_group_attention.

    The per-block query rotations come from the plan's cos/sin (built from inv_freq once per forward), so
    inv_freq itself is unused here. `chunk_keys` (a multiple of BLOCK_N) fixes the flash-decoding split;
    by default it is chosen to fill the device.
    """
    cache = group.cache
    num_q_heads, n, dim = q.shape
    num_kv = cache.common_k.shape[1]
    if q.device.type != "cuda" and isinstance(_chunk_kernel, triton.JITFunction):
        raise RuntimeError("the Triton attention needs CUDA tensors (or TRITON_INTERPRET=1 before Triton's import)")
    if dim not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedModelError(f"the Triton attention supports head_dim {SUPPORTED_HEAD_DIMS}, not {dim}")
    assert num_q_heads % num_kv == 0, "query heads must be a multiple of KV heads"
    assert chunk_keys is None or (chunk_keys > 0 and chunk_keys % BLOCK_N == 0), "chunk_keys must be a BLOCK_N multiple"
    q = q if q.stride(-1) == 1 else q.contiguous()
    num_groups = num_q_heads // num_kv
    rows = num_groups * n
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    row_tiles = triton.cdiv(rows, block_m)
    launches = _launches(group, layer, row_tiles * num_kv, q.device, chunk_keys)
    num_chunks = sum(keys.num_chunks for keys in launches)
    partial = torch.empty((num_chunks, num_kv, rows, dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((num_chunks, num_kv, rows), dtype=torch.float32, device=q.device)
    out = torch.empty((num_kv, rows, dim), dtype=q.dtype, device=q.device)
    merge = bool(MERGE_IN_CHUNKS)
    counters = _counters(q.device, row_tiles * num_kv) if merge else lse  # a placeholder pointer without MERGE
    # One launch takes both tensors' strides through the same kernel variables, so they must share an int width.
    both = bool(ONE_LAUNCH) and len(launches) == 2 and max(keys.k.stride(0) for keys in launches) < 2**31
    try:
        if both:
            _launch_chunks(launches[0], launches[1], 0, num_chunks, q, group, partial, lse, out, counters, n,
                           num_groups, row_tiles, num_kv, scale, block_m, merge)
        else:
            first_chunk = 0
            for keys in launches:
                _launch_chunks(keys, None, first_chunk, num_chunks, q, group, partial, lse, out, counters, n,
                               num_groups, row_tiles, num_kv, scale, block_m, merge)
                first_chunk += keys.num_chunks
    except BaseException:
        if merge:  # a launch that did not run left its row tiles' counts short: no later call may inherit them
            counters.zero_()
        raise
    if merge:
        return out.view(num_q_heads, n, dim)
    merge_dims = min(MERGE_DIMS, dim)
    _merge_kernel[(triton.cdiv(rows, MERGE_ROWS), num_kv, dim // merge_dims)](
        partial, lse, out,
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        rows, num_chunks,
        BLOCK_D=merge_dims, BLOCK_R=MERGE_ROWS,
    )
    return out.view(num_q_heads, n, dim)


def _launch_chunks(
    keys: _KeyBlocks, second: _KeyBlocks | None, first_chunk: int, num_chunks: int, q: torch.Tensor,
    group: GroupPlan, partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, counters: torch.Tensor, n: int,
    num_groups: int, row_tiles: int, num_kv: int, scale: float, block_m: int, merge: bool,
) -> None:
    """One launch of the chunk kernel over the chunks of `keys`, then (when given) those of `second`."""
    keys2 = second or keys  # without a second tensor its arguments are placeholders the kernel never reads
    assert keys.k.stride(2) == keys2.k.stride(2), "both tensors share the stride between keys"
    programs = keys.num_chunks + (second.num_chunks if second else 0)
    _chunk_kernel[(row_tiles, num_kv, programs)](
        q, group.cos, group.sin, group.vis, keys.k, keys.v, partial, lse, out, counters, keys2.k, keys2.v,
        q.stride(0), q.stride(1),
        group.cos.stride(0), group.cos.stride(3),
        group.vis.stride(0), group.vis.stride(1),
        keys.k.stride(0), keys.k.stride(1), keys.k.stride(2),
        keys2.k.stride(0), keys2.k.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        n, num_groups, keys.first_block, keys.length, keys.chunk_keys,
        keys.num_chunks // keys.k.shape[0], first_chunk, num_chunks, scale * LOG2_E,
        keys2.first_block, keys2.length, keys2.chunk_keys, keys2.num_chunks // keys2.k.shape[0], keys.num_chunks,
        HALF=q.shape[-1] // 2, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", MERGE=merge, ONE_DOT=bool(ONE_DOT),
        BOTH=second is not None,
        num_stages=STAGES.get(q.dtype, DEFAULT_STAGES), num_warps=CHUNK_WARPS,
    )


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
MIN_COUNTERS = 4096  # (row tile, KV head) pairs of the first counter table: 1024 tokens of 8 KV heads, 4 per head


def _counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counters on `device`: one table shared by every call on the device, since each
    call's mergers leave their counters at zero and calls on a device run one after another on its stream.

    A bigger table replaces it when needed, but outgrown tables are kept: a decode step captured in a CUDA graph
    still points at the table it was captured with."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must find the same table
        device = torch.device("cuda", torch.cuda.current_device())
    tables = _COUNTERS.setdefault(device, [])
    if not tables or tables[-1].numel() < count:
        tables.append(torch.zeros(max(MIN_COUNTERS, triton.next_power_of_2(count)), dtype=torch.int32, device=device))
    return tables[-1]


def _launches(
    group: GroupPlan, layer: int, programs_per_chunk: int, device: torch.device, chunk_keys: int | None
) -> list[_KeyBlocks]:
    """The common block, then (when any token sees one) the small blocks, each with its chunk size."""
    cache = group.cache
    assert cache.common_k.stride() == cache.common_v.stride() and cache.small_k.stride() == cache.small_v.stride()
    target = _target_programs(device)
    common_keys = chunk_keys or _chunk_keys(group.common_len, programs_per_chunk, target)
    launches = [_KeyBlocks(cache.common_k[layer][None], cache.common_v[layer][None], 0, group.common_len, common_keys)]
    if group.small_len:
        num_small = cache.small_k.shape[1]
        small_keys = chunk_keys or _chunk_keys(group.small_len, programs_per_chunk * num_small, target)
        launches.append(_KeyBlocks(cache.small_k[layer], cache.small_v[layer], 1, group.small_len, small_keys))
    return [keys for keys in launches if keys.length]
