"""The shared KV cache of one session, for every layer.

Invariants:
- Block 0 is the common block (chat prompt, past-steps header, then the shared history). Blocks 1.. are the
  small blocks: section labels and each worker's current step.
- Every block's keys are stored rotated at block-local positions 0..len-1; a block is never re-rotated except
  once, when a finished step moves to the end of the common block.
- Tensors are preallocated and grow by whole chunks (amortised, never per token); `lengths` lives on the host.
- Given limits (the longest common block and the longest small block the session can write), growth stops at
  them, so the memory a cache holds never passes `held_tokens_bound` of those limits: what admission reserves.
"""

from __future__ import annotations

import torch

from engine.rope import cos_sin, rotate

GROWTH_CHUNK = 256  # tokens; the common block's capacity is a multiple of this
SMALL_GROWTH_CHUNK = 64  # tokens; the small blocks' capacity is a multiple of this: labels and single steps, one
# allocation for all of them (workers + 2 blocks), so a coarse chunk would hold far more than the session uses


def _round_up(n: int, chunk: int = GROWTH_CHUNK) -> int:
    return -(-n // chunk) * chunk


def held_tokens_bound(common_limit: int, small_limit: int, num_small_blocks: int) -> int:
    """Token slots (per layer, keys and values alike) a cache whose blocks stay within these limits holds at most:
    the common block's, plus one small block's for every small block (they share one allocation)."""
    return _round_up(common_limit) + num_small_blocks * _round_up(small_limit, SMALL_GROWTH_CHUNK)


def _grown(capacity: int, needed: int, limit: int, chunk: int) -> int:
    """A new capacity for `needed` tokens: half again as much (amortised growth), but not past the limit while
    the limit holds what is needed (past it, growth stays amortised)."""
    wanted = max(needed, capacity * 3 // 2)
    if limit and needed <= limit:
        wanted = min(wanted, limit)
    return _round_up(wanted, chunk)


class SessionCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_small_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        common_capacity: int = GROWTH_CHUNK,
        small_capacity: int = SMALL_GROWTH_CHUNK,
        common_limit: int = 0,
        small_limit: int = 0,
    ) -> None:
        """`common_limit` and `small_limit` (0: none) are the most tokens the common block and any one small block
        will hold: growth stops there."""
        self.common_limit, self.small_limit = common_limit, small_limit
        shape = (num_layers, num_kv_heads, _round_up(common_capacity), head_dim)
        small = (num_layers, num_small_blocks, num_kv_heads, _round_up(small_capacity, SMALL_GROWTH_CHUNK), head_dim)
        self.common_k = torch.zeros(shape, dtype=dtype, device=device)  # (L, Hkv, Cc, D)
        self.common_v = torch.zeros(shape, dtype=dtype, device=device)
        self.small_k = torch.zeros(small, dtype=dtype, device=device)  # (L, Bs, Hkv, Cs, D)
        self.small_v = torch.zeros(small, dtype=dtype, device=device)
        self.lengths = [0] * (1 + num_small_blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.common_k, self.common_v, self.small_k, self.small_v))

    def reserve(self, block: int, length: int) -> None:
        """Makes room for `block` to hold `length` tokens, growing the backing tensor by chunks if needed."""
        if block == 0 and length > self.common_k.shape[2]:
            new = _grown(self.common_k.shape[2], length, self.common_limit, GROWTH_CHUNK)
            self.common_k = _grow(self.common_k, 2, new)
            self.common_v = _grow(self.common_v, 2, new)
        elif block > 0 and length > self.small_k.shape[3]:
            new = _grown(self.small_k.shape[3], length, self.small_limit, SMALL_GROWTH_CHUNK)
            self.small_k = _grow(self.small_k, 3, new)
            self.small_v = _grow(self.small_v, 3, new)

    def migrate(self, block: int, inv_freq: torch.Tensor) -> None:
        """Appends small `block` to the end of the common block and empties it.

        Its keys were rotated at local positions p; at common position start + p they need one more rotation
        by `start`, applied to all layers at once.
        """
        length, start = self.lengths[block], self.lengths[0]
        self.reserve(0, start + length)
        keys = self.small_k[:, block - 1, :, :length]  # (L, Hkv, length, D)
        cos, sin = cos_sin(torch.tensor(start, device=keys.device), inv_freq, keys.dtype)  # (D,)
        self.common_k[:, :, start : start + length] = rotate(keys, cos, sin)
        self.common_v[:, :, start : start + length] = self.small_v[:, block - 1, :, :length]
        self.lengths[0] = start + length
        self.lengths[block] = 0


def _grow(tensor: torch.Tensor, dim: int, capacity: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = capacity
    grown = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    grown.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return grown
