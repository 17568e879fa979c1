"""Incremental detokenization that only ever emits complete UTF-8 text."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas.

    Invariant: the concatenation of all returned deltas equals decode(all ids) except for a held-back tail
    that ends inside a multi-byte character; that tail is returned once a later token completes it.
    A small window of earlier ids is decoded along with new ones so tokenizers that merge spaces at token
    boundaries produce the right text. `context` holds ids the text continues (already shown elsewhere): they
    open the first window and are never returned, so a first token that starts a word keeps its space with
    tokenizers whose decode strips one leading space (SentencePiece ones: Llama 2, Mistral).
    """

    def __init__(self, tokenizer: object, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context)
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # ids before this have been emitted

    def feed(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """Adds one id; returns the new complete text and the ids it came from, or ("", ()) while held back."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return "", ()
        ids = tuple(self._ids[self._read :])
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :], ids
