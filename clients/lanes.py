"""Terminal lanes: each worker's text shown live, one lane per worker, then the final answer.

On a terminal (TTY) the bottom of the screen is a live region with one lane per worker, in the worker's
colour, holding the tail of its current step; finished steps are printed above it in history order, so the
scrollback reads as the shared history. Anywhere else (a pipe, a log file) complete lines are written as
they form, each prefixed with "[Name] ", and no escape sequence is ever written.
Text from the model is shown with its control characters removed, so it cannot move the cursor.
"""

from __future__ import annotations

import os
import re
import sys
import time
import unicodedata
from typing import Any, TextIO

KINDS = ("token", "inserted", "step_end", "answer")
COLORS = ("36", "35", "33", "32", "34", "31", "96", "95")  # cyan magenta yellow green blue red, bright cyan/magenta
RESET, BOLD, DIM = "\x1b[0m", "\x1b[1m", "\x1b[2;3m"
DEFAULT_WIDTH = 80
DEFAULT_HEIGHT = 24
REDRAW_INTERVAL_S = 0.05  # at most ~20 redraws a second: smooth to the eye, cheap for the terminal
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")


class LaneRenderer:
    """Renders one session's events. feed() in generation order, then finish() once.

    is_tty, width and height default to what `stream` is; redraw_interval_s limits how often the live region
    is redrawn (0 redraws on every event).
    """

    def __init__(
        self,
        names: list[str],
        stream: TextIO = sys.stdout,
        *,
        is_tty: bool | None = None,
        width: int | None = None,
        height: int | None = None,
        redraw_interval_s: float = REDRAW_INTERVAL_S,
    ) -> None:
        self.names = list(names)
        self._stream = stream
        self._is_tty = _is_tty(stream) if is_tty is None else is_tty
        self._started = time.monotonic()
        self._answer: str | None = None
        if self._is_tty:
            columns, rows = _terminal_size(stream)
            self._view: _TtyView | _PlainView = _TtyView(
                self.names, stream, width or columns, height or rows, redraw_interval_s
            )
        else:
            self._view = _PlainView(self.names, stream)

    def feed(self, worker: int, kind: str, text: str) -> None:
        """kind "token"/"inserted" extend the worker's current step; "step_end" moves the step (text) to the
        history; "answer" records the final answer (text) shown by finish()."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not 0 <= worker < len(self.names):
            raise ValueError(f"worker {worker} out of range for {len(self.names)} lanes")
        if kind == "answer":
            self._answer = text
            return
        self._view.feed(worker, kind, clean(text))

    def finish(self, answer: str | None = None, usage: dict[str, Any] | None = None) -> None:
        """Flushes every lane, then prints the answer (the given one, else the last fed) and the usage."""
        final = answer if answer is not None else self._answer
        lines = summary(final, usage, self.names, time.monotonic() - self._started)
        self._view.finish(lines)


class _PlainView:
    """Line-prefixed output: a worker's line is written once it is complete; blank lines are skipped."""

    def __init__(self, names: list[str], stream: TextIO) -> None:
        self._names = names
        self._stream = stream
        self._pending = ["" for _ in names]

    def feed(self, worker: int, kind: str, text: str) -> None:
        if kind == "step_end":
            self._flush(worker)
            return
        *complete, self._pending[worker] = (self._pending[worker] + text).split("\n")
        self._write(worker, complete)

    def finish(self, summary_lines: list[str]) -> None:
        for worker in range(len(self._names)):
            self._flush(worker)
        self._stream.write("".join(line + "\n" for line in summary_lines))
        self._stream.flush()

    def _flush(self, worker: int) -> None:
        self._write(worker, [self._pending[worker]])
        self._pending[worker] = ""

    def _write(self, worker: int, lines: list[str]) -> None:
        shown = [f"[{self._names[worker]}] {line.rstrip()}\n" for line in lines if line.strip()]
        if shown:
            self._stream.write("".join(shown))
            self._stream.flush()


class _TtyView:
    """A live region of lanes at the bottom of the terminal, redrawn in place; history printed above it.

    Invariant: after every write the cursor sits at column 0 of the line just below the live region, and the
    region is `self._drawn` lines tall, so moving up that many lines and clearing to the end erases it.
    """

    def __init__(self, names: list[str], stream: TextIO, width: int, height: int, redraw_interval_s: float) -> None:
        self._names = names
        self._stream = stream
        self._label_width = max(len(n) for n in names) if names else 0
        self._text_width = max(10, width - self._label_width - 4)  # "name ▌ " and a spare last column
        self._lane_rows = max(1, min(2, (height - 2) // max(1, len(names))))
        self._interval = redraw_interval_s
        self._steps: list[list[tuple[str, bool]]] = [[] for _ in names]  # current step: (text, is_inserted)
        self._drawn = 0
        self._last_draw = float("-inf")

    def feed(self, worker: int, kind: str, text: str) -> None:
        if kind == "step_end":
            self._steps[worker] = []
            self._redraw(history=self._block(worker, text, note=""))
            return
        self._steps[worker].append((text, kind == "inserted"))
        if time.monotonic() - self._last_draw >= self._interval:
            self._redraw()

    def finish(self, summary_lines: list[str]) -> None:
        unfinished = "".join(
            self._block(w, "".join(text for text, _ in step), note=" (unfinished)")
            for w, step in enumerate(self._steps)
            if "".join(text for text, _ in step).strip()
        )
        answer, *rest = summary_lines
        footer = f"\n{BOLD}{answer}{RESET}\n" + "".join(f"{DIM}{line}{RESET}\n" for line in rest)
        self._steps = [[] for _ in self._names]
        self._redraw(history=unfinished + footer, lanes=False)

    def _redraw(self, history: str = "", lanes: bool = True) -> None:
        erase = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        rows = [row for w in range(len(self._names)) for row in self._lane(w)] if lanes else []
        self._stream.write(erase + history + "".join(row + "\n" for row in rows))
        self._stream.flush()
        self._drawn = len(rows)
        self._last_draw = time.monotonic()

    def _block(self, worker: int, text: str, note: str) -> str:
        """A finished (or cut-off) step for the history: a coloured bar before each of its lines."""
        color = COLORS[worker % len(COLORS)]
        lines = [line.rstrip() for line in text.strip("\n").split("\n")]
        head = f"\x1b[{color}m{BOLD}{self._names[worker]}{RESET}\x1b[{color}m{note}{RESET}\n"
        return head + "".join(f"\x1b[{color}m▌{RESET} {line}\n" for line in lines) + "\n"

    def _lane(self, worker: int) -> list[str]:
        color = COLORS[worker % len(COLORS)]
        rows = wrap_tail(self._steps[worker], self._text_width, self._lane_rows)
        name, blank = self._names[worker].ljust(self._label_width), " " * self._label_width
        bar = f"\x1b[{color}m▌{RESET}"
        return [f"\x1b[{color}m{BOLD}{name if i == 0 else blank}{RESET} {bar} {row}" for i, row in enumerate(rows)]


def wrap_tail(segments: list[tuple[str, bool]], width: int, num_rows: int) -> list[str]:
    """The end of a step's text folded into exactly num_rows rows of at most `width` cells, whitespace
    collapsed, inserted text dimmed. Short text fills rows from the top; long text shows its last part."""
    chars: list[tuple[str, bool]] = []
    budget = width * num_rows
    for text, is_inserted in reversed(segments):
        for char in reversed(_SPACES.sub(" ", text)):
            budget -= cell_width(char)
            if budget < 0:
                break
            chars.append((char, is_inserted))
        if budget < 0:
            break
    chars.reverse()
    rows: list[list[tuple[str, bool]]] = [[]]
    used = 0
    for char, is_inserted in chars:
        if used + cell_width(char) > width:
            rows.append([])
            used = 0
        rows[-1].append((char, is_inserted))
        used += cell_width(char)
    rows += [[] for _ in range(num_rows - len(rows))]
    return [_styled(row) for row in rows[-num_rows:]]


def _styled(row: list[tuple[str, bool]]) -> str:
    out, current = [], False
    for char, is_inserted in row:
        if is_inserted != current:
            out.append(DIM if is_inserted else RESET)
            current = is_inserted
        out.append(char)
    if current:
        out.append(RESET)
    return "".join(out)


def summary(answer: str | None, usage: dict[str, Any] | None, names: list[str], elapsed_s: float) -> list[str]:
    """The closing lines: the answer first, then token counts, steps and speed when usage is known."""
    lines = [f"Answer: {clean(answer).strip()}" if answer is not None else "Answer: (none)"]
    if usage:
        per_worker = usage.get("completion_tokens_per_worker") or []
        steps = usage.get("steps_per_worker") or []
        tokens = ", ".join(f"{n} {t}" for n, t in zip(names, per_worker, strict=False))
        rate = usage["completion_tokens"] / elapsed_s if elapsed_s > 0 else 0.0
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        lines.append(
            f"Tokens: {usage['prompt_tokens']} prompt" + (f" ({cached} cached)" if cached else "")
            + f", {usage['completion_tokens']} completion"
            + (f" ({tokens})" if tokens else "")
            + f"; steps: {sum(steps)}; {elapsed_s:.1f} s, {rate:.1f} tokens/s"
        )
    return lines


def clean(text: str) -> str:
    """Text safe to print: tabs become spaces, other control characters (escape included) are dropped."""
    return _CONTROL.sub("", text.replace("\t", "    "))


def cell_width(char: str) -> int:
    """Terminal cells a character takes: 0 for combining marks, 2 for wide East Asian characters, else 1."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _terminal_size(stream: TextIO) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return DEFAULT_WIDTH, DEFAULT_HEIGHT
    return size.columns or DEFAULT_WIDTH, size.lines or DEFAULT_HEIGHT
