"""Step-end and answer rules on plain text."""

from __future__ import annotations

import pytest

from engine.text import closed_box, ends_inside_token, extract_boxed, has_open_block, is_step_end


@pytest.mark.parametrize(
    "step_text,token,expected",
    [
        ("**Alice [1]:** I will check the sum", ".\n\n", True),  # sentence end in the same token
        ("We split the work.", "\n\n", True),
        ("We split the work.\n", "\n", True),  # tokenizers that emit one newline per token
        ("Is it prime?", "\n\n", True),
        ('He said "done."', "\n\n", True),  # closing quote after the period
        ("First, the easy part,", "\n\n", False),  # after a comma
        ("A list:", "\n\n", False),
        ("We split the work.", " and", False),  # no blank line
        ("We split the work.", "\n", False),  # a single newline
        ("```python\nx = 1.", "\n\n", False),  # inside an open code fence
        ("```python\nx = 1\n```\nDone.", "\n\n", True),  # the fence is closed
        ("~~~\ncode.", "\n\n", False),
        ("$$ x = 1.", "\n\n", False),  # inside $$ math
        ("$$ x = 1 $$ so x is one.", "\n\n", True),
    ],
)
def test_step_end_rule(step_text: str, token: str, expected: bool) -> None:
    assert is_step_end(step_text, token) is expected


def test_dollar_signs_inside_code_do_not_open_math() -> None:
    assert not has_open_block("```sh\necho $$\n```\nok.")
    assert has_open_block("```sh\necho hi\n")


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so the result is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}} and later \\boxed{3}", "\\frac{1}{2}"),
        ("unfinished \\boxed{4", None),
        ("no answer here", None),
        ("\\boxed{ x = 2 }", "x = 2"),
        ("\\boxed{}", None),  # an empty box answers nothing
        ("I will put it within \\boxed{ }. It is \\boxed{7}.", "7"),
    ],
)
def test_answer_extraction(text: str, answer: str | None) -> None:
    assert extract_boxed(text) == answer


@pytest.mark.parametrize(
    ("step_text", "token_text", "inside"),
    [
        ("We add them", ".\n\n", True),  # punctuation merged with the blank line (Qwen, Llama 3)
        ("We add them", ").\n\n", True),
        ("We add them.", "\n\n", False),  # only the blank line: it opens the next step
        ("We add them.\n", "\n", False),  # the blank line completed by a split newline
        ("We add them.", "\n\n ", False),
    ],
)
def test_a_step_ending_token_is_told_apart_by_whether_it_holds_step_text(
    step_text: str, token_text: str, inside: bool
) -> None:
    assert is_step_end(step_text, token_text)
    assert ends_inside_token(step_text, token_text) is inside


@pytest.mark.parametrize(
    "inside,content",
    [("42} and more", "42"), ("\\frac{1}{2} }", "\\frac{1}{2}"), (" }", ""), ("4", None), ("{nested}", None)],
)
def test_a_box_continued_from_its_opening_brace_closes_at_its_own_brace(inside: str, content: str | None) -> None:
    assert closed_box(inside) == content
