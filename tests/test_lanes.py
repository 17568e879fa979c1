"""Terminal lanes: plain line-prefixed output for pipes and logs, and a live region of lanes on a terminal."""

from __future__ import annotations

import io
import re

import pytest

from clients.lanes import LaneRenderer, cell_width, summary, wrap_tail

USAGE = {
    "prompt_tokens": 30,
    "completion_tokens": 12,
    "total_tokens": 42,
    "completion_tokens_per_worker": [7, 5],
    "steps_per_worker": [2, 1],
}


class Screen:
    """A minimal terminal: printable characters (wrapping at the width), newline, cursor-previous-line
    (CSI n F), erase-below (CSI J) and colours (ignored). Enough to see what a person would see."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.lines: list[str] = [""]
        self.row = 0

    def write(self, data: str) -> None:
        for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|.", data, flags=re.DOTALL):
            self._apply(token)

    def _apply(self, token: str) -> None:
        if token.startswith("\x1b["):
            command, argument = token[-1], token[2:-1]
            if command == "F":
                self.row = max(0, self.row - int(argument or 1))
            elif command == "J":
                self.lines = self.lines[: self.row] + [""]
            else:
                assert command == "m", f"unexpected escape {token!r}"
            return
        assert token == "\n" or token.isprintable(), f"control character {token!r} reached the terminal"
        if token == "\n" or len(self.lines[self.row]) == self.width:  # a full line wraps, as terminals do
            self.row += 1
            self.lines += [""] * (self.row + 1 - len(self.lines))
        if token != "\n":
            self.lines[self.row] += token

    def flush(self) -> None:
        """Nothing is buffered."""

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.lines).strip("\n")


def test_plain_output_prefixes_complete_lines_with_worker_names() -> None:
    out = io.StringIO()
    lanes = LaneRenderer(["Alice", "Bob"], out)
    lanes.feed(0, "inserted", "**Alice [1]:** ")
    lanes.feed(0, "token", "Hi, I'm")
    lanes.feed(1, "token", "Bob here.\nI will check")
    assert out.getvalue() == "[Bob] Bob here.\n", "only complete lines are written"
    lanes.feed(0, "token", " Alice.\n\n")
    lanes.feed(0, "step_end", "**Alice [1]:** Hi, I'm Alice.\n\n")
    lanes.feed(1, "token", " the sum.")
    lanes.feed(1, "answer", "42")
    lanes.finish(None, USAGE)
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["[Bob] Bob here.", "[Alice] **Alice [1]:** Hi, I'm Alice.", "[Bob] I will check the sum."]
    assert lines[3] == "Answer: 42"
    assert lines[4].startswith("Tokens: 30 prompt, 12 completion (Alice 7, Bob 5); steps: 3;")
    assert "\x1b" not in out.getvalue()


def test_summary_names_the_prompt_tokens_the_prefix_cache_supplied() -> None:
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 16}}
    lines = summary("42", usage, ["Alice", "Bob"], 2.0)
    assert lines[1].startswith("Tokens: 30 prompt (16 cached), 12 completion (Alice 7, Bob 5); steps: 3;")


def test_plain_output_strips_control_characters_from_model_text() -> None:
    out = io.StringIO()
    lanes = LaneRenderer(["Alice"], out)
    lanes.feed(0, "token", "red\x1b[31m text\r\x07 done\n")
    lanes.finish("7\x1b[2J", None)
    assert out.getvalue() == "[Alice] red[31m text done\nAnswer: 7[2J\n"


def test_explicit_answer_wins_and_missing_answer_is_said() -> None:
    out = io.StringIO()
    lanes = LaneRenderer(["Alice"], out)
    lanes.feed(0, "answer", "1")
    lanes.finish("2", None)
    assert out.getvalue().splitlines()[-1] == "Answer: 2"
    other = io.StringIO()
    LaneRenderer(["Alice"], other).finish(None, None)
    assert other.getvalue() == "Answer: (none)\n"


def test_bad_worker_or_kind_is_refused() -> None:
    lanes = LaneRenderer(["Alice"], io.StringIO())
    with pytest.raises(ValueError, match="out of range"):
        lanes.feed(1, "token", "x")
    with pytest.raises(ValueError, match="unknown event kind"):
        lanes.feed(0, "finish", "")


def test_tty_shows_one_live_lane_per_worker_with_the_tail_of_its_step() -> None:
    screen = Screen(width=40)
    lanes = LaneRenderer(["Alice", "Bob"], screen, is_tty=True, width=40, height=24, redraw_interval_s=0)  # type: ignore[arg-type]
    lanes.feed(0, "inserted", "**Alice [1]:** ")
    lanes.feed(0, "token", "Hi, I'm Alice.")
    lanes.feed(1, "token", "Bob starts")
    assert [line.rstrip() for line in screen.lines] == [
        "Alice ▌ **Alice [1]:** Hi, I'm Alice.",
        "      ▌",
        "Bob   ▌ Bob starts",
        "      ▌",
        "",
    ]
    lanes.feed(1, "token", " and then writes a long paragraph that cannot fit in two rows of this lane at all")
    bob_rows = screen.lines[2:4]
    assert all(len(row) <= 40 for row in bob_rows)
    bob_text = "".join(row.split("▌ ", 1)[1] for row in bob_rows)
    assert bob_text == "long paragraph that cannot fit in two rows of this lane at all", "the last 2 x 31 cells"
    assert "Bob starts" not in screen.text(), "a long step shows its end, not its beginning"


def test_tty_prints_finished_steps_above_the_lanes_in_history_order() -> None:
    screen = Screen(width=80)
    lanes = LaneRenderer(["Alice", "Bob"], screen, is_tty=True, width=80, height=24, redraw_interval_s=0)  # type: ignore[arg-type]
    lanes.feed(1, "token", "Bob's first thought.\n\n")
    lanes.feed(1, "step_end", "**Bob [1]:** Bob's first thought.\n\n")
    lanes.feed(0, "token", "Alice is still going")
    lanes.feed(1, "token", "Bob's second")
    text = screen.text()
    assert text.index("**Bob [1]:** Bob's first thought.") < text.index("Alice ▌ Alice is still going")
    assert text.count("Bob's first thought") == 1, "the finished step left Bob's lane"
    lanes.feed(0, "answer", "9")
    lanes.finish(None, USAGE)
    final = screen.text()
    assert "Alice (unfinished)\n▌ Alice is still going" in final
    assert "Bob (unfinished)\n▌ Bob's second" in final
    assert "▌ Alice is still going" in final and "Alice ▌" not in final, "the live lanes are gone"
    assert re.search(r"Answer: 9\nTokens: 30 prompt, 12 completion \(Alice 7, Bob 5\); steps: 3; [\d.]+ s", final)


def test_tty_redraws_are_throttled_but_finish_shows_everything() -> None:
    out = io.StringIO()
    lanes = LaneRenderer(["Alice"], out, is_tty=True, width=80, height=24, redraw_interval_s=3600)
    for index in range(50):
        lanes.feed(0, "token", f" t{index}")
    assert out.getvalue().count("▌") == 2, "one redraw (two lane rows) for fifty tokens"
    lanes.finish(None, None)
    assert "t49" in out.getvalue()


def test_wrap_tail_counts_wide_characters_and_marks_inserted_text() -> None:
    rows = wrap_tail([("ab", True), ("漢字漢字", False)], width=4, num_rows=2)
    assert rows == ["漢字", "漢字"], "eight cells of tail: the two inserted letters do not fit"
    rows = wrap_tail([("ab", True), ("漢字漢", False)], width=4, num_rows=2)
    assert [re.sub(r"\x1b\[[0-9;]*m", "", row) for row in rows] == ["ab漢", "字漢"]
    rows = wrap_tail([("ab", True), ("cd", False)], width=10, num_rows=2)
    assert rows == ["\x1b[2;3mab\x1b[0mcd", ""]
    assert cell_width("漢") == 2 and cell_width("a") == 1 and cell_width("\u0301") == 0
