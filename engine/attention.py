"""Hogwild! attention over the shared cache: a fast batched path and its slow, obviously-correct twin.

Both take the model's q/k/v for the packed row (q and k already rotated by the model at block-local positions),
write k/v into each session's cache, and attend with one softmax over every block of each token's view.

- fast: rotates each query once per block (delta = own offset - block offset), scores the common block and all
  small blocks with two batched matmuls, masks what the token cannot see, one softmax, two matmuls for values.
- reference: for every token, rotates every visible block's keys to their view positions, concatenates them
  in view order and runs ordinary attention. Same function, much higher cost.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from engine.plan import ForwardPlan, GroupPlan
from engine.rope import cos_sin, rotate

ATTENTION_NAME = "hogwild"


def hogwild_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, Hq, N, D)
    key: torch.Tensor,  # (1, Hkv, N, D)
    value: torch.Tensor,  # (1, Hkv, N, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    hogwild: ForwardPlan | None = None,
    inv_freq: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The function registered with transformers' AttentionInterface under ATTENTION_NAME."""
    if hogwild is None or inv_freq is None:
        raise RuntimeError("the hogwild attention runs only inside an engine forward (plan and inv_freq missing)")
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attend = BACKENDS[hogwild.attention]
    out = torch.empty_like(query[0])  # (Hq, N, D)
    for group in hogwild.groups:
        q, k, v = query[0, :, group.rows], key[0, :, group.rows], value[0, :, group.rows]
        write_cache(group, layer, k, v)
        out[:, group.rows] = attend(group, layer, q, scale, inv_freq)
    return out.transpose(0, 1).unsqueeze(0), None  # (1, N, Hq, D)


def write_cache(group: GroupPlan, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Stores this forward's keys/values (Hkv, n, D) at their block-local positions."""
    cache = group.cache
    if group.common_rows.numel():
        cache.common_k[layer][:, group.common_pos] = k[:, group.common_rows]
        cache.common_v[layer][:, group.common_pos] = v[:, group.common_rows]
    if group.small_rows.numel():
        cache.small_k[layer][group.small_block, :, group.small_pos] = k[:, group.small_rows].transpose(0, 1)
        cache.small_v[layer][group.small_block, :, group.small_pos] = v[:, group.small_rows].transpose(0, 1)


def fast_group_attention(
    group: GroupPlan, layer: int, q: torch.Tensor, scale: float, inv_freq: torch.Tensor
) -> torch.Tensor:
    """q (Hq, n, D) -> attention output (Hq, n, D) over the session's cache."""
    if group.is_prompt:
        return prompt_attention(group, layer, q, scale)
    cache = group.cache
    num_q_heads, n, dim = q.shape
    num_kv = cache.common_k.shape[1]
    rows = num_q_heads // num_kv * n  # query rows per KV head (G * n)
    lc, ls = group.common_len, group.small_len
    # Every block's rotation of the queries at once (one op chain, not one per block): (1 + Bs, Hkv, G*n, D).
    rotated = rotate(q.view(1, num_kv, -1, n, dim), group.cos, group.sin).reshape(-1, num_kv, rows, dim)
    scores = rotated[0] @ cache.common_k[layer][:, :lc].transpose(1, 2)  # (Hkv, G*n, Lc)
    if ls:
        small_k = cache.small_k[layer][:, :, :ls]  # (Bs, Hkv, S, D)
        num_small = small_k.shape[0]
        small = rotated[1:] @ small_k.transpose(2, 3)  # (Bs, Hkv, G*n, S)
        scores = torch.cat([scores, small.permute(1, 2, 0, 3).reshape(num_kv, rows, num_small * ls)], dim=2)
    scores = scores.float().view(num_kv, -1, n, scores.shape[-1]) * scale + group.mask  # (Hkv, G, n, cols)
    probs = scores.softmax(dim=-1).to(q.dtype).view(num_kv, rows, -1)
    out = probs[..., :lc] @ cache.common_v[layer][:, :lc]  # (Hkv, G*n, D)
    if ls:
        small_p = probs[..., lc:].reshape(num_kv, rows, num_small, ls).permute(2, 0, 1, 3)  # (Bs, Hkv, G*n, S)
        out = out + (small_p @ cache.small_v[layer][:, :, :ls]).sum(dim=0)
    return out.view(num_q_heads, n, dim)


def prompt_attention(group: GroupPlan, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    """A prompt-prefill group (GroupPlan.is_prompt): q (Hq, n, D) attends causally to the common block.

    The keys sit at the positions the queries were rotated to, so no query is rotated again and the fused
    kernel of scaled_dot_product_attention does the whole job, reading each KV head once for its query heads.
    """
    cache = group.cache
    lc = group.common_len
    k, v = cache.common_k[layer][None, :, :lc], cache.common_v[layer][None, :, :lc]  # (1, Hkv, Lc, D)
    out = F.scaled_dot_product_attention(q[None], k, v, attn_mask=group.visible_common, scale=scale, enable_gqa=True)
    return out[0]


def reference_group_attention(
    group: GroupPlan, layer: int, q: torch.Tensor, scale: float, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Token by token: explicit view with keys re-rotated to view positions, then plain softmax attention."""
    cache = group.cache
    num_q_heads, n, _ = q.shape
    num_kv = cache.common_k.shape[1]
    out = torch.empty_like(q)
    for i in range(n):
        keys, values, own_offset = _explicit_view(group, layer, i, inv_freq)  # (Hkv, L, D) x2
        cos, sin = cos_sin(torch.tensor(own_offset, device=q.device), inv_freq, q.dtype)
        qi = rotate(q[:, i], cos, sin)  # (Hq, D): from its local position to its view position
        keys = keys.repeat_interleave(num_q_heads // num_kv, dim=0)
        values = values.repeat_interleave(num_q_heads // num_kv, dim=0)
        scores = (keys @ qi[:, :, None]).squeeze(-1).float() * scale  # (Hq, L)
        out[:, i] = (scores.softmax(-1).to(q.dtype)[:, None, :] @ values).squeeze(1)
    return out


def _explicit_view(
    group: GroupPlan, layer: int, i: int, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token i's view as one flat key/value sequence with keys rotated at view positions; and its own offset."""
    cache = group.cache
    vis, offset = group.vis[i].tolist(), group.offset[i].tolist()
    order = sorted((b for b in range(len(vis)) if vis[b] > 0), key=lambda b: offset[b])  # own block is last
    keys, values = [], []
    for b in order:
        k = cache.common_k[layer][:, : vis[b]] if b == 0 else cache.small_k[layer][b - 1, :, : vis[b]]
        v = cache.common_v[layer][:, : vis[b]] if b == 0 else cache.small_v[layer][b - 1, :, : vis[b]]
        cos, sin = cos_sin(torch.tensor(offset[b], device=k.device), inv_freq, k.dtype)
        keys.append(rotate(k, cos, sin))  # stored at local j, now at view position offset + j
        values.append(v)
    return torch.cat(keys, dim=1), torch.cat(values, dim=1), offset[int(group.own[i])]


def triton_group_attention(
    group: GroupPlan, layer: int, q: torch.Tensor, scale: float, inv_freq: torch.Tensor
) -> torch.Tensor:
    """engine.triton_attention's kernel, imported on first use: Triton fixes its mode (GPU, or its CPU
    interpreter under TRITON_INTERPRET=1) when first imported, so importing this module must not import it."""
    from engine.triton_attention import triton_group_attention as kernel

    if group.is_prompt:  # the kernel is built for decode; prefill chunks go to the fused causal kernel
        return prompt_attention(group, layer, q, scale)
    return kernel(group, layer, q, scale, inv_freq)


BACKENDS = {"torch": fast_group_attention, "reference": reference_group_attention}
if importlib.util.find_spec("triton") is not None:
    BACKENDS["triton"] = triton_group_attention

TRITON_HEAD_DIMS = (64, 128)


def default_attention(device: torch.device, head_dim: int) -> str:
    """The Triton kernel on CUDA when Triton is installed and supports the head size, else the PyTorch path."""
    if device.type == "cuda" and "triton" in BACKENDS and head_dim in TRITON_HEAD_DIMS:
        return "triton"
    return "torch"
