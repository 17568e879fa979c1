"""Prompt prefix caching: the keys/values of prompt tokens, kept across sessions for prompts that start alike.

A prompt is written to the common block from position 0 and its tokens see only the tokens before them, so the
keys/values of a prompt's first n tokens depend on those n tokens alone: any later prompt that starts with the
same tokens can copy them instead of computing them. The chat prompt opens with the collaboration rules, which
are the same for every request with the same worker names, so most of a short task's prompt is found here.

Storage is in pages of PAGE_TOKENS tokens, each a (layers, kv heads, PAGE_TOKENS, head dim) pair of tensors
keyed by a digest chain: a page's key digests its parent's key and its own token ids, so one key names the whole
prefix up to the page's end. Past `capacity_tokens` the least recently used pages go first; a prefix's pages
are touched deepest first, so a page is never older than the pages after it and eviction trims prefixes from
their ends.

Copied keys/values equal computed ones up to floating-point rounding (the matrix products that computed them
had another batch shape), so a session that reuses a prefix can differ from one that computed it in the last
bits of its logits.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.cache import SessionCache

PAGE_TOKENS = 16


@dataclass
class _Page:
    keys: torch.Tensor  # (L, Hkv, PAGE_TOKENS, D)
    values: torch.Tensor


class PrefixCache:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_pages = max(0, capacity_tokens) // PAGE_TOKENS
        self._pages: OrderedDict[bytes, _Page] = OrderedDict()
        self._page_bytes = 0  # every page of one engine has the same shape and dtype

    @property
    def num_tokens(self) -> int:
        return len(self._pages) * PAGE_TOKENS

    @property
    def nbytes(self) -> int:
        return len(self._pages) * self._page_bytes

    def page_keys(self, token_ids: list[int]) -> list[bytes]:
        """The keys of the prompt's full pages, in order (none when the cache is off)."""
        if not self.capacity_pages:
            return []
        keys, parent = [], b""
        for start in range(0, len(token_ids) - PAGE_TOKENS + 1, PAGE_TOKENS):
            digest = hashlib.blake2b(parent, digest_size=16)
            digest.update(array("q", token_ids[start : start + PAGE_TOKENS]).tobytes())
            parent = digest.digest()
            keys.append(parent)
        return keys

    def cached_pages(self, keys: list[bytes]) -> int:
        """How many leading pages of a prompt with these page keys are held."""
        count = 0
        while count < len(keys) and keys[count] in self._pages:
            count += 1
        return count

    def restore(self, keys: list[bytes], cache: SessionCache) -> int:
        """Copies the held pages `keys` (a prompt's leading pages) into the common block; returns the tokens copied.

        `cache` must have room for them (a session's cache is created with room for its whole prompt)."""
        for index, key in enumerate(keys):
            page = self._pages[key]
            span = slice(index * PAGE_TOKENS, (index + 1) * PAGE_TOKENS)
            cache.common_k[:, :, span] = page.keys
            cache.common_v[:, :, span] = page.values
        self._touch(keys)
        tokens = len(keys) * PAGE_TOKENS
        cache.lengths[0] = max(cache.lengths[0], tokens)
        return tokens

    def store(self, keys: list[bytes], cache: SessionCache) -> None:
        """Keeps the pages of a prompt whose keys/values `cache` holds at common positions 0.. (at most as many
        leading pages as fit the capacity), then evicts down to the capacity."""
        keys = keys[: self.capacity_pages]
        for index, key in enumerate(keys):
            if key not in self._pages:
                span = slice(index * PAGE_TOKENS, (index + 1) * PAGE_TOKENS)
                page = self._pages[key] = _Page(cache.common_k[:, :, span].clone(), cache.common_v[:, :, span].clone())
                self._page_bytes = page.keys.nbytes + page.values.nbytes
        self._touch(keys)
        while len(self._pages) > self.capacity_pages:
            self._pages.popitem(last=False)

    def clear(self) -> None:
        self._pages.clear()

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # deepest first: the prefix's first page ends up the most recently used
            self._pages.move_to_end(key)
