"""Pure text rules: where a step ends, and where the final answer is. No tokenizer, no torch."""

from __future__ import annotations

import re

STEP_SEPARATOR = "\n\n"
SENTENCE_ENDINGS = (".", "?", "!", "。", "？", "！")  # noqa: RUF001 - CJK full stops end sentences too
TRAILING_CLOSERS = "\"')]*_”’»`"  # noqa: RUF001 - may follow the sentence end: quotes, brackets, emphasis
FENCE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)
BOXED = "\\boxed{"
BRACE_DEPTH = {"{": 1, "}": -1}


def ends_sentence(text: str) -> bool:
    """True when text (ignoring trailing spaces, quotes, brackets and emphasis marks) ends with . ? ! or kin."""
    return text.rstrip().rstrip(TRAILING_CLOSERS).endswith(SENTENCE_ENDINGS)


def has_open_block(text: str) -> bool:
    """True inside an unclosed code fence (``` or ~~~ at a line start) or an unclosed $$ math block."""
    segments = FENCE.split(text)[::2]  # text between fences (split also returns the captured fence marks)
    if len(segments) % 2 == 0:
        return True
    return sum(part.count("$$") for part in segments[::2]) % 2 == 1  # $$ outside code only


def is_step_end(step_text: str, token_text: str) -> bool:
    """Whether the sampled `token_text`, appended to the current `step_text`, ends the step.

    A step ends when the token completes a blank line ("\\n\\n": inside the token, or its leading newline
    after the newline that ended the step text, as tokenizers that split newlines produce), the text before
    that blank line ends a sentence, and no code fence or $$ block is open. No token count is involved.
    """
    cut = _blank_line_at(step_text, token_text)
    if cut < 0:
        return False
    before = (step_text + token_text)[:cut]
    return ends_sentence(before) and not has_open_block(before)


def ends_inside_token(step_text: str, token_text: str) -> bool:
    """For a token that ends the step (is_step_end): whether it also carries the step's last text, as tokenizers
    that merge punctuation with the blank line produce ('.\n\n'), rather than only the blank line."""
    return bool(token_text[: max(0, _blank_line_at(step_text, token_text) - len(step_text))].strip())


def _blank_line_at(step_text: str, token_text: str) -> int:
    """Where in step_text + token_text the token completes a blank line (-1: it completes none). Runs for every
    sampled token, so only the step text's last character is looked at, not the whole step copied."""
    tail = step_text[-1:]
    at = (tail + token_text).find(STEP_SEPARATOR)
    return at if at < 0 else len(step_text) - len(tail) + at


def extract_boxed(text: str) -> str | None:
    """The content of the first complete \\boxed{...} (nested braces allowed) that holds something, or None.

    An empty box is no answer: a model that mentions the format ("I will put it in \\boxed{}") has not
    answered yet."""
    start = text.find(BOXED)
    while start >= 0:
        inside = start + len(BOXED)
        end = _closing_brace(text, inside)
        if end >= 0 and text[inside:end].strip():
            return text[inside:end].strip()
        start = text.find(BOXED, start + 1)
    return None


def closed_box(inside: str) -> str | None:
    """For text that continues an open \\boxed{: the box's content once it has closed (possibly empty), else None."""
    end = _closing_brace(inside, 0)
    return inside[:end].strip() if end >= 0 else None


def _closing_brace(text: str, inside: int) -> int:
    """Index of the brace that closes a box whose content starts at `inside` (nested braces allowed), or -1."""
    depth = 1
    for i in range(inside, len(text)):
        depth += BRACE_DEPTH.get(text[i], 0)
        if depth == 0:
            return i
    return -1
