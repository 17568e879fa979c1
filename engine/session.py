"""One task worked on by several workers: what each feeds next, what it sees, and what its samples mean.

Block layout in the session's cache:
    0           common: chat prompt + past-steps header + history (finished steps, in the order they finished)
    1           OTHERS_LABEL
    2           OWN_LABEL
    3 + w       worker w's current step
Worker w's view: common, OTHERS_LABEL, the other workers' current steps (ascending), OWN_LABEL, its own step.

A session is driven by the engine in two calls per forward: `runs()` says what to feed (moving finished steps
into the history first), `commit(token_ids)` takes one sampled token per worker that fed something. It returns
nothing: the events a session causes collect in it until `take_events()` returns them, in generation order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine import prompts
from engine.cache import SessionCache
from engine.config import SessionRequest
from engine.detokenizer import IncrementalDecoder
from engine.events import (
    AnswerEvent,
    DoneEvent,
    Event,
    FinishReason,
    InsertedEvent,
    StepEndEvent,
    TokenEvent,
    Usage,
    WorkerView,
)
from engine.model import LoadedModel
from engine.plan import Run
from engine.text import closed_box, ends_inside_token, extract_boxed, is_step_end

COMMON, OTHERS_LABEL, OWN_LABEL = 0, 1, 2
FIRST_STEP_BLOCK = 3
FINISHER_MAX_TOKENS = 32
PREFILL_CHUNK = 512  # prompt tokens per forward
DECODER_CONTEXT_IDS = 4  # ids of a worker's seed its first sampled text is decoded with


@dataclass
class Tokens:
    """Token ids with a parallel flag per id: True when the model sampled it, False when the engine wrote it."""

    ids: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)

    def extend(self, ids: list[int], sampled: bool | list[bool]) -> None:
        self.ids.extend(ids)
        self.sampled.extend(sampled if isinstance(sampled, list) else [sampled] * len(ids))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Worker:
    index: int
    name: str
    decoder: IncrementalDecoder
    step: int = 1
    block: Tokens = field(default_factory=Tokens)  # what the cache holds of the current step
    pending: Tokens = field(default_factory=Tokens)  # fed at the next forward
    text: str = ""  # the current step's text (inserted + sampled)
    generated: int = 0
    step_done: bool = False  # its last token ended the step: move the block to the history first
    closing: bool = False  # that token also holds the step's last text ('.\n\n'): it joins the step first


class Session:
    def __init__(
        self,
        session_id: str,
        request: SessionRequest,
        prompt_ids: list[int],
        model: LoadedModel,
        cache: SessionCache,
        view_limit: int | None = None,
    ) -> None:
        """`view_limit`: the most tokens a view may hold, when lower than the model's context (what the session
        reserved); past it, or past the context, the session ends with finish_reason "length"."""
        self.id = session_id
        self.request = request
        self.cache = cache
        tokenizer = model.tokenizer
        self._encode = model.inserted_text
        self._eos_ids = model.eos_token_ids
        self._view_limit = min(model.context_length, view_limit or model.context_length)
        self._inv_freq = model.inv_freq
        self.common = Tokens()
        self.common.extend(prompt_ids, False)
        self.labels = (self._encode(prompts.OTHERS_LABEL), self._encode(prompts.OWN_LABEL))
        self.workers = [Worker(i, name, IncrementalDecoder(tokenizer)) for i, name in enumerate(request.names)]
        self._events: list[Event] = []
        self._generated = 0  # sampled tokens over all workers, for the redundancy check cadence
        self._next_check = request.redundancy_check_every or None
        self._check_due = False
        self._decode_rounds = 0  # lockstep forwards that sampled a token for every worker (the budget counts these)
        self._finishing = False
        self._finisher_text = ""
        self._finisher_reason: FinishReason = "length"
        self._finisher_tokens = 0
        self._prompt_len = len(prompt_ids)
        self._prefilled = 0  # prompt tokens already fed (or copied from the prefix cache)
        self.cached_prompt_tokens = 0  # prompt tokens copied from the prefix cache instead of computed
        self.answer: str | None = None
        self.done = False
        self.history: list[tuple[int, int]] = []  # (worker, step) of each block in the history, in order
        for worker in self.workers:
            first = prompts.first_step(worker.name, worker.index)
            self._insert(worker, first, "header")
            # Sampled text continues the seed: decoded along with its last ids, a first word keeps its space.
            worker.decoder = IncrementalDecoder(tokenizer, context=worker.pending.ids[-DECODER_CONTEXT_IDS:])
        # What usage counts: the chat prompt, the section labels and every worker's first-step opening.
        self.prompt_tokens = len(prompt_ids) + sum(map(len, self.labels)) + sum(len(w.pending) for w in self.workers)

    # ---- what to feed -------------------------------------------------------------------------------------

    def runs(self) -> list[Run]:
        """The tokens of this session's next forward. Moves finished steps into the history first."""
        if self.is_prefilling:
            return self._prefill_runs()
        feeding = self._feeding
        opening = [w for w in feeding if w.step_done and not w.closing]  # a worker that no longer writes opens none
        # Only when steps are far shorter than the checks assumed; checked before any step opens, so the session
        # never announces a header it does not write.
        if self.longest_view() + self._opening_tokens(opening) > self._view_limit:
            self._finish(("length",) * len(self.workers))
            return []
        for worker in opening:
            self._start_next_step(worker)
        return self._worker_runs(feeding)

    def _prefill_runs(self) -> list[Run]:
        """The prompt in chunks (bounding the work of one forward); the last chunk brings labels and first steps."""
        start = self._prefilled
        self._prefilled = min(start + PREFILL_CHUNK, self._prompt_len)
        runs = [Run(COMMON, start, tuple(self.common.ids[start : self._prefilled]), ())]
        if self.is_prefilling:
            return runs
        others, own = self.labels
        lc = len(self.common)
        runs += [
            Run(OTHERS_LABEL, 0, tuple(others), ((COMMON, lc),)),
            Run(OWN_LABEL, 0, tuple(own), ((COMMON, lc), (OTHERS_LABEL, len(others)))),
        ]
        return runs + self._worker_runs(self.workers)

    def _worker_runs(self, workers: list[Worker]) -> list[Run]:
        """What `workers` feed. Every block takes its tokens before any view is taken, so each worker sees what
        all the others feed in the same forward (every key is written before attention), whatever its index."""
        fed = [(worker, len(worker.block), tuple(worker.pending.ids)) for worker in workers]
        for worker in workers:
            worker.block.extend(worker.pending.ids, worker.pending.sampled)
            worker.pending = Tokens()
        return [
            Run(FIRST_STEP_BLOCK + worker.index, start, ids, self._view(worker), want_logits=True)
            for worker, start, ids in fed
        ]

    def _view(self, worker: Worker) -> tuple[tuple[int, int], ...]:
        """Worker's view before its own step, with the other blocks' lengths after this forward."""
        others, own = self.labels
        steps = tuple(
            (FIRST_STEP_BLOCK + w.index, len(w.block)) for w in self.workers if w is not worker and len(w.block)
        )
        return ((COMMON, len(self.common)), (OTHERS_LABEL, len(others))) + steps + ((OWN_LABEL, len(own)),)

    def _opening_tokens(self, workers: list[Worker]) -> int:
        """Tokens that opening the next steps of `workers` adds: their headers, and the redundancy check if due."""
        headers = sum(len(self._encode(prompts.step_header(w.name, w.step + 1))) for w in workers)
        check = len(self._encode(prompts.REDUNDANCY_CHECK)) if workers and self._check_due else 0
        return headers + check

    def _start_next_step(self, worker: Worker) -> None:
        """Moves the finished step to the end of the history and opens the next one with its header."""
        self.cache.migrate(FIRST_STEP_BLOCK + worker.index, self._inv_freq)
        self.common.extend(worker.block.ids, worker.block.sampled)
        self.history.append((worker.index, worker.step))
        separator = worker.pending
        worker.block, worker.pending, worker.text, worker.step_done = Tokens(), separator, "", False
        worker.step += 1
        self._insert(worker, prompts.step_header(worker.name, worker.step), "header")
        if self._check_due:
            self._check_due = False
            self._insert(worker, prompts.REDUNDANCY_CHECK, "intervention")

    def _insert(self, worker: Worker, text: str, reason: str) -> None:
        ids = self._encode(text)
        worker.pending.extend(ids, False)
        worker.text += text.lstrip("\n") if not worker.text else text
        self._events.append(InsertedEvent(worker.index, worker.step, text, tuple(ids), reason))  # type: ignore[arg-type]

    # ---- what the samples mean -----------------------------------------------------------------------------

    def take_events(self) -> list[Event]:
        """Events since the last call, in generation order; the last one of a session is a DoneEvent."""
        events, self._events = self._events, []
        return events

    def commit(self, token_ids: list[int]) -> None:
        """Takes one sampled id per worker fed by the last `runs()`."""
        if self._finishing:
            self._commit_finisher(token_ids[0])
        else:
            for worker, token_id in zip(self.workers, token_ids, strict=True):
                if worker.closing:  # it fed its step's last token; what it sampled after it belongs to no step
                    worker.closing = False
                    continue
                self._commit_token(worker, token_id)
                if self.done or self._finishing:  # the others' samples of this round are dropped with it
                    break
            if not self.done and not self._finishing:
                self._decode_rounds += 1
                if self._decode_rounds >= self.request.max_tokens:
                    self._out_of_budget()

    def _commit_token(self, worker: Worker, token_id: int) -> None:
        worker.generated += 1
        self._count_generated()
        if token_id in self._eos_ids:  # never fed: the session ends, or the finisher's text follows the step's
            if self.request.final_answer and self.answer is None:  # a worker ended its turn without an answer
                self._start_finisher("stop")
            else:
                self._finish(("stop",) * len(self.workers))
            return
        worker.pending.extend([token_id], True)
        text, ids = worker.decoder.feed(token_id)
        if not text:
            return
        self._events.append(TokenEvent(worker.index, worker.step, text, ids))
        ends_step = is_step_end(worker.text, text)
        closing = ends_step and ends_inside_token(worker.text, text)
        worker.text += text
        if "}" in text and (answer := extract_boxed(worker.text)) is not None:
            self._give_answer(worker, answer)
            self._finish(("stop",) * len(self.workers))
        elif ends_step:
            # A token that only completes the blank line opens the next step, before its header; one that also
            # ends the step's text ('.\n\n') is fed into this step first, so the history keeps every step whole.
            worker.step_done, worker.closing = True, closing
            self._events.append(StepEndEvent(worker.index, worker.step, worker.text.strip()))

    def _count_generated(self) -> None:
        self._generated += 1
        if self._next_check is not None and self._generated >= self._next_check:
            self._check_due = True
            self._next_check += self.request.redundancy_check_every

    def _out_of_budget(self) -> None:
        if not self.request.final_answer or self.answer is not None:
            self._finish(("length",) * len(self.workers))
            return
        self._start_finisher("length")

    def _start_finisher(self, reason: FinishReason) -> None:
        """Worker 0 alone, greedy, concludes with a \\boxed{} answer; the session then ends with `reason`."""
        self._finishing, self._finisher_reason = True, reason
        worker = self.workers[0]
        worker.step_done = worker.closing = False  # the finisher continues worker 0's current step, as it is
        self._insert(worker, prompts.FINISHER, "finisher")

    def _commit_finisher(self, token_id: int) -> None:
        worker = self.workers[0]
        worker.pending.extend([token_id], True)
        worker.generated += 1  # usage counts every token the model wrote; the budget does not count these
        self._finisher_tokens += 1
        text, ids = worker.decoder.feed(token_id)
        if text:
            self._events.append(TokenEvent(worker.index, worker.step, text, ids))
            self._finisher_text += text
        content = closed_box(self._finisher_text)  # the finisher's text starts inside its box
        exhausted = token_id in self._eos_ids or self._finisher_tokens >= FINISHER_MAX_TOKENS
        if content is not None or exhausted:
            if content:  # an empty box answers nothing
                self._give_answer(worker, content)
            self._finish((self._finisher_reason,) * len(self.workers))

    def _give_answer(self, worker: Worker, answer: str) -> None:
        self.answer = answer
        self._events.append(AnswerEvent(worker.index, worker.step, answer))

    def _finish(self, reasons: tuple[FinishReason, ...]) -> None:
        self.done = True
        views = tuple(self.view(w.index) for w in self.workers) if self.request.return_views else None
        usage = Usage(
            prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            completion_tokens_per_worker=tuple(w.generated for w in self.workers),
            steps_per_worker=tuple(w.step for w in self.workers),
        )
        self._events.append(DoneEvent(usage, reasons, self.answer, views))

    # ---- inspection ---------------------------------------------------------------------------------------

    def view(self, index: int) -> WorkerView:
        """Worker `index`'s view as the cache holds it: token ids in view order and which were sampled."""
        worker = self.workers[index]
        others, own = self.labels
        parts = [self.common, Tokens(list(others), [False] * len(others))]
        parts += [w.block for w in self.workers if w is not worker]
        parts += [Tokens(list(own), [False] * len(own)), worker.block]
        return WorkerView(
            token_ids=tuple(i for p in parts for i in p.ids),
            is_sampled=tuple(s for p in parts for s in p.sampled),
        )

    def longest_view(self) -> int:
        """Tokens the longest worker view will hold after the next forward."""
        fixed = len(self.common) + sum(map(len, self.labels)) + sum(len(w.block) for w in self.workers)
        return fixed + sum(len(w.pending) for w in self._feeding)  # every view holds every block: all that is fed

    @property
    def _feeding(self) -> list[Worker]:
        """The workers the next forward feeds: all of them, or worker 0 alone while the finisher runs."""
        return self.workers[:1] if self._finishing else self.workers

    def prompt_restored(self, tokens: int) -> None:
        """The cache already holds the prompt's first `tokens` (copied by the prefix cache): prefill starts after
        them. Only before the first prefill forward, and never the whole prompt (the last chunk must run)."""
        if self._prefilled or not 0 <= tokens < self._prompt_len:
            raise ValueError(f"cannot restore {tokens} prompt tokens of {self._prompt_len} after {self._prefilled}")
        self._prefilled = self.cached_prompt_tokens = tokens

    @property
    def prompt_len(self) -> int:
        return self._prompt_len

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens the cache holds (fed by forwards or restored from the prefix cache)."""
        return self._prefilled

    @property
    def has_started(self) -> bool:
        """True once a forward has fed this session, or a prefix of its prompt was restored."""
        return self._prefilled > 0

    @property
    def is_prefilling(self) -> bool:
        """True until the forward that feeds the last prompt chunk, the labels and the first steps."""
        return self._prefilled < self._prompt_len

    @property
    def next_prefill_tokens(self) -> int:
        """Prompt tokens the next prefill forward feeds (0 once the prompt is in)."""
        return min(PREFILL_CHUNK, self._prompt_len - self._prefilled)

    @property
    def is_finishing(self) -> bool:
        """True while the finisher runs: worker 0 alone, greedy, beyond the budget (usage counts its tokens)."""
        return self._finishing
