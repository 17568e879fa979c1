"""The words the engine writes: collaboration rules, section labels, step headers, seeds, checks, finisher.

Each worker's view reads as one assistant turn:
    <chat prompt: rules + task> PAST_STEPS_HEADER <history>
    OTHERS_LABEL <the other workers' current steps> OWN_LABEL <own current step>
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.exceptions import TemplateError

PAST_STEPS_HEADER = "### Past steps\n"
OTHERS_LABEL = "\n\n### Work in progress (others)\n"
OWN_LABEL = "\n\n### Work in progress (own)\n"
# Inserted texts end where a word would begin and open with the space before their first word: tokenizers fold
# a word's leading space into its token, so a text ending in a space leaves a lone space token that models
# rarely saw before a word (after "**Alice [2]:** " small Qwen and SmolLM models wrote a digit 3 times in 4).
REDUNDANCY_CHECK = " Quick check: am I doing redundant work? (yes/no):"
FINISHER = (
    "\n\nTime is up, so I have to give the final answer right now. "
    "Considering all the work above, the final answer is \\boxed{"
)


def collaboration_rules(names: tuple[str, ...]) -> str:
    """System prompt for len(names) workers; a single worker gets plain step-by-step rules."""
    answer = "When the answer is known, put it once within \\boxed{}."
    if len(names) == 1:
        return (
            f"You are {names[0]}, an assistant solving the user's task step by step. Write short paragraphs "
            f"separated by blank lines; your finished paragraphs appear under \"Past steps\". {answer}"
        )
    team = ", ".join(names[:-1]) + f" and {names[-1]}"
    return (
        f"You are one of {len(names)} assistants ({team}) solving the user's task together, writing at the same "
        "time. You work in steps: short paragraphs that end with a blank line. Everyone sees the team's finished "
        "steps under \"Past steps\", the others' unfinished steps under \"Work in progress (others)\" as they are "
        "written, token by token, and continues their own step under \"Work in progress (own)\".\n"
        "How to collaborate:\n"
        "- Agree on a plan quickly: split the task into parts, check each other's results, or try different "
        "approaches.\n"
        "- Never redo what another assistant has done or is doing. If you notice you are doing redundant work, "
        "say so and switch to something else at once.\n"
        "- Build on the others' results as soon as they appear.\n"
        f"- Any one of you may give the team's final answer. {answer}"
    )


def step_header(name: str, step: int) -> str:
    return f"**{name} [{step}]:**"


def first_step(name: str, index: int) -> str:
    """The first step of every worker: a blank line, its header, and a short seed."""
    seed = f"Hi, I'm {name}. Here's how we can" if index == 0 else f"Hi, I'm {name}."
    return "\n\n" + step_header(name, 1) + " " + seed


class InsertedText:
    """Token ids of the texts the engine inserts into running text (labels, headers, checks, the finisher).

    A SentencePiece tokenizer puts a dummy-prefix space ('▁') before every text it encodes; inside running text
    there is none (a header after a blank line would read "\n\n **Alice", and a text that opens with a space would
    get two). For such a tokenizer a text is encoded after an anchor newline whose tokens are then dropped; other
    tokenizers encode it as it is.
    """

    ANCHOR = "\n"

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        first = tokenizer.convert_ids_to_tokens(self._plain("a")[:1])  # type: ignore[attr-defined]
        self._anchor = self._plain(self.ANCHOR) if first and first[0].startswith("▁") else None

    def __call__(self, text: str) -> list[int]:
        if self._anchor is None:
            return self._plain(text)
        ids = self._plain(self.ANCHOR + text)
        if ids[: len(self._anchor)] != self._anchor:  # the anchor merged with the text: no clean cut exists
            return self._plain(text)
        return ids[len(self._anchor) :]

    def _plain(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ChatPrompt:
    """The common block's opening text: the chat-formatted rules and task, then the past-steps header."""

    text: str

    @classmethod
    def build(cls, tokenizer: object, names: tuple[str, ...], task: str) -> ChatPrompt:
        rules = collaboration_rules(names)
        if not getattr(tokenizer, "chat_template", None):
            return cls(f"{rules}\n\nTask: {task}\n\n" + PAST_STEPS_HEADER)
        messages = [{"role": "system", "content": rules}, {"role": "user", "content": task}]
        try:
            chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError:  # a template without a system turn (Mistral's refuse one): the rules open the task
            messages = [{"role": "user", "content": f"{rules}\n\nTask: {task}"}]
            chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return cls(chat + PAST_STEPS_HEADER)
