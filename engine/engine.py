"""The engine: running sessions advance together, one batched forward per step, over their shared caches.

    def step(self):
        runs = session.runs() for every session      # what each worker feeds, in which view
        logits = self.forward_logits(plan)           # one packed forward of all runs, no padding
        token_ids = sample(logits, ...)              # one token per worker that fed something
        session.commit(token_ids)                    # step ends, answers, budget -> events
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine import prompts
from engine.attention import default_attention
from engine.cache import SessionCache, held_tokens_bound
from engine.config import EngineConfig, SamplingParams, SessionRequest
from engine.decode_graphs import DecodeGraphs
from engine.errors import (
    CacheBudgetError,
    CapacityError,
    ConfigurationError,
    ContextLengthError,
    InvalidRequestError,
)
from engine.events import ErrorEvent, Event, WorkerView
from engine.model import LoadedModel, load_model
from engine.plan import ForwardPlan, build_forward, reserve_runs
from engine.prefix_cache import PAGE_TOKENS, PrefixCache
from engine.sampling import make_generator, sample
from engine.session import FINISHER_MAX_TOKENS, Session

log = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0.0)
ASSUMED_MIN_STEP_TOKENS = 32  # the context check allows one step header per this many sampled tokens
PREFILL_TOKENS_PER_STEP = 1024  # prompt tokens one forward takes on top of the decoding sessions' tokens
WARM_UP_TASK = "Say hello."
HUGE_PROMPT_MARGIN = 64  # tokens past the context a prompt's beginning must reach to be refused unread
TYPICAL_TOKEN_CHARS = 8  # characters per token that ordinary text stays well under


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check needing the model (Engine.checked), with what the checks computed."""

    request: SessionRequest
    prompt_ids: tuple[int, ...]  # the chat prompt: rules and task
    longest_view: int  # tokens its longest view could reach (its common block can hold no more)
    prompt_tokens: int  # as usage counts them: the chat prompt, the section labels and first-step openings
    longest_step: int  # tokens any one of its small blocks could reach (labels, a worker's step)
    cache_tokens: int  # KV token slots its cache could grow to: what it reserves of the cache budget


@dataclass
class PromptPages:
    """A prefilling session's prompt pages (engine.prefix_cache keys) and how many of them are stored."""

    keys: list[bytes]
    stored: int = 0

    @property
    def unstored(self) -> list[bytes]:
        return self.keys[self.stored :]


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.attention = default_attention(model.device, model.head_dim)  # a name in engine.attention.BACKENDS
        self._sessions: dict[str, Session] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._reserved: dict[str, int] = {}
        self.prefix_cache = PrefixCache(self.config.prefix_cache_tokens)
        self.graphs: DecodeGraphs | None = None  # replays decode forwards; see engine.decode_graphs
        graphs_apply = model.device.type == "cuda" and self.attention == "triton"
        if graphs_apply and self.config.cuda_graphs is not False:
            self.graphs = DecodeGraphs(self.forward_logits)
        elif self.config.cuda_graphs:
            log.warning("decode graphs replay the Triton attention on a CUDA device (this engine: %s, %s attention); "
                        "decode steps run eagerly", model.device, self.attention)
        # Every prefilling session's prompt pages; an entry leaves when the forward that ends its prefill succeeds.
        self._prompt_pages: dict[str, PromptPages] = {}

    @classmethod
    def load(cls, config: EngineConfig, progress: Callable[[str], None] | None = None) -> Engine:
        config.validate()
        return cls(load_model(config, progress), config)

    def warm_up(self) -> None:
        """Runs one short session before serving, so the first request does not pay for what a first forward
        sets up (kernel compilation on a GPU, library initialisation) and finds the default team's collaboration
        rules in the prefix cache."""
        request = SessionRequest(
            prompt=WARM_UP_TASK, num_workers=min(2, self.config.max_workers), max_tokens=min(2, self.config.max_tokens),
            sampling=GREEDY, redundancy_check_every=0, final_answer=False,
        )
        try:
            self.checked(request)
        except CacheBudgetError as error:
            raise ConfigurationError(
                f"the KV-cache budget of {self.config.cache_budget_tokens} tokens (HOGWILD_CACHE_BUDGET_TOKENS) cannot "
                f"hold even a {request.num_workers}-worker session of {request.max_tokens} tokens, which reserves "
                f"{error.tokens}; raise it, or set 0 for no budget"
            ) from None
        except ContextLengthError:
            raise ConfigurationError(
                f"the context of {self.model_name} ({self.context_length} tokens) cannot hold even a short "
                f"{request.num_workers}-worker session (the collaboration rules and a one-line task)"
            ) from None
        for event in self.generate(request):
            if isinstance(event, ErrorEvent):
                raise RuntimeError(event.message)

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def num_running(self) -> int:
        return len(self._sessions)

    @property
    def reserved_tokens(self) -> int:
        """KV token slots the running sessions' caches may grow to together (what admission control counts)."""
        return sum(self._reserved.values())

    @property
    def cache_bytes(self) -> int:
        """Bytes the running sessions' KV caches hold."""
        return sum(s.cache.nbytes for s in self._sessions.values())

    @property
    def prefix_cache_bytes(self) -> int:
        return self.prefix_cache.nbytes

    # ---- admission ----------------------------------------------------------------------------------------

    def check(self, request: SessionRequest) -> int:
        """Every check possible before work starts; returns the chat prompt's token count (the common block
        before any worker writes: rules and task)."""
        return len(self.checked(request).prompt_ids)

    def checked(self, request: SessionRequest) -> CheckedRequest:
        """Every check possible before work starts, and what they computed, for add_session to reuse."""
        request.validate(self.config.max_workers, self.config.max_tokens)
        self._refuse_special_tokens(request)
        self._refuse_huge_prompt(request.prompt)
        prompt_ids = self._prompt_ids(request)
        longest = self.longest_view_bound(request, len(prompt_ids))
        shortest = self.longest_view_bound(dataclasses.replace(request, max_tokens=1), len(prompt_ids))
        if shortest > self.context_length:
            workers = f"{request.num_workers} worker" + ("s" if request.num_workers > 1 else "")
            raise ContextLengthError(
                f"the prompt takes {len(prompt_ids)} tokens with the collaboration rules; with the labels and step "
                f"headers of {workers} even one token each needs {shortest}, more than the model's context of "
                f"{self.context_length}; shorten the prompt",
                "prompt",
            )
        if longest > self.context_length:
            raise ContextLengthError(
                f"this session could reach {longest} tokens (prompt {len(prompt_ids)} + {request.num_workers} "
                f"workers x {request.max_tokens} tokens + step headers), more than the model's context of "
                f"{self.context_length}; shorten the prompt or lower max_tokens or workers",
                "max_tokens",
            )
        longest_step = self.longest_step_bound(request)
        cache_tokens = held_tokens_bound(longest, longest_step, request.num_workers + 2)
        budget = self.config.cache_budget_tokens
        if budget and cache_tokens > budget:
            raise CacheBudgetError(
                f"this session's KV cache could grow to {cache_tokens} tokens, more than this server's whole cache "
                f"budget of {budget}; lower max_tokens or workers",
                cache_tokens,
                "max_tokens",
            )
        prompt_tokens = len(prompt_ids) + self._opening_tokens(request.names)  # as the session's usage counts them
        return CheckedRequest(request, tuple(prompt_ids), longest, prompt_tokens, longest_step, cache_tokens)

    def add_session(self, session_id: str, request: SessionRequest | CheckedRequest) -> None:
        """Admits a session (checking it first unless `checked` already did); it is prefilled on the next step."""
        if session_id in self._sessions:
            raise InvalidRequestError(f"session '{session_id}' already exists")
        checked = request if isinstance(request, CheckedRequest) else self.checked(request)
        request, prompt_ids, reserve = checked.request, list(checked.prompt_ids), checked.cache_tokens
        if len(self._sessions) >= self.config.max_sessions:
            raise CapacityError(f"{self.config.max_sessions} sessions are already running")
        budget = self.config.cache_budget_tokens
        if budget and self.reserved_tokens + reserve > budget:
            raise CapacityError(f"the KV cache budget of {budget} tokens is taken by running sessions")
        m = self.model
        cache = SessionCache(
            m.num_layers, m.num_kv_heads, m.head_dim, request.num_workers + 2, m.dtype, m.device,
            common_capacity=len(prompt_ids) + 1, common_limit=checked.longest_view, small_limit=checked.longest_step,
        )
        # Under a budget a session must stay within what it reserved: one whose steps are far shorter than the
        # bound assumed (more step headers) ends at its longest view instead of growing past it.
        view_limit = checked.longest_view if budget else None
        self._sessions[session_id] = Session(session_id, request, prompt_ids, m, cache, view_limit)
        self._generators[session_id] = make_generator(request.sampling.seed, m.device)
        self._reserved[session_id] = reserve
        self._prompt_pages[session_id] = PromptPages(self.prefix_cache.page_keys(prompt_ids))

    def cancel(self, session_id: str) -> bool:
        """Drops a session and its cache at once; it yields no more events."""
        self._generators.pop(session_id, None)
        self._reserved.pop(session_id, None)
        self._prompt_pages.pop(session_id, None)
        return self._sessions.pop(session_id, None) is not None

    def view(self, session_id: str, worker: int) -> WorkerView:
        """A running session's worker view as token ids in view order, flagged where the model sampled them."""
        return self._sessions[session_id].view(worker)

    def longest_view_bound(self, request: SessionRequest, prompt_tokens: int) -> int:
        """Tokens the longest view can reach: prompt, labels, every worker's budget and what the engine inserts."""
        encode = self._token_count
        workers, budget = request.num_workers, request.max_tokens
        headers = sum(
            encode(prompts.step_header(name, budget)) * math.ceil(budget / ASSUMED_MIN_STEP_TOKENS)
            for name in request.names
        )
        checks = 0
        if request.redundancy_check_every:
            checks = encode(prompts.REDUNDANCY_CHECK) * math.ceil(workers * budget / request.redundancy_check_every)
        finisher = self._finisher_tokens(request)
        return prompt_tokens + self._opening_tokens(request.names) + headers + workers * budget + checks + finisher

    def longest_step_bound(self, request: SessionRequest) -> int:
        """Tokens one small block can reach: a section label, or one worker's step (its opening or header and a
        redundancy check, every token of its budget, and for worker 0 the finisher)."""
        encode = self._token_count
        check = encode(prompts.REDUNDANCY_CHECK) if request.redundancy_check_every else 0
        inserted = max(
            max(encode(prompts.first_step(name, i)), encode(prompts.step_header(name, request.max_tokens)) + check)
            for i, name in enumerate(request.names)
        )
        finisher = self._finisher_tokens(request)
        labels = max(encode(prompts.OTHERS_LABEL), encode(prompts.OWN_LABEL))
        return max(labels, inserted + request.max_tokens + finisher)

    def _finisher_tokens(self, request: SessionRequest) -> int:
        """Tokens the finisher can add to worker 0's step: its text and the most it samples."""
        return self._token_count(prompts.FINISHER) + FINISHER_MAX_TOKENS if request.final_answer else 0

    def _opening_tokens(self, names: tuple[str, ...]) -> int:
        """Tokens a session feeds with its chat prompt: the two section labels and every worker's first step."""
        openings = (prompts.first_step(name, i) for i, name in enumerate(names))
        return sum(map(self._token_count, (prompts.OTHERS_LABEL, prompts.OWN_LABEL, *openings)))

    @functools.cached_property
    def _token_count(self) -> Callable[[str], int]:
        """Tokens of one of the engine's own short texts (labels, headers, checks), remembered: every request's
        checks count the same few texts several times."""
        encode = self.model.inserted_text
        return functools.lru_cache(maxsize=4096)(lambda text: len(encode(text)))

    def _refuse_special_tokens(self, request: SessionRequest) -> None:
        """Refuses a prompt or worker name that spells one of the tokenizer's special tokens: the tokenizer would
        read it as that token, letting text end the user's turn or open a system turn in the chat format."""
        if self._special_tokens is None:
            return
        for param, texts in (("prompt", (request.prompt,)), ("worker_names", request.worker_names or ())):
            for text in texts:
                if found := self._special_tokens.search(text):
                    raise InvalidRequestError(
                        f"{param} must not contain the model's special token {found.group()!r}", param
                    )

    @functools.cached_property
    def _special_tokens(self) -> re.Pattern[str] | None:
        tokens = getattr(self.model.tokenizer, "added_tokens_decoder", {}).values()
        specials = sorted({token.content for token in tokens if token.special and token.content}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, specials))) if specials else None

    def _refuse_huge_prompt(self, prompt: str) -> None:
        """Refuses a prompt far longer than the context after tokenizing only a bounded beginning of it: requests
        are checked in the engine's loop, and tokenizing megabytes there would stall every running session. The
        first look assumes ordinary text (TYPICAL_TOKEN_CHARS per token), the second any text the vocabulary can
        spell; a prompt neither refuses is tokenized whole, as every prompt is."""
        needed = self.context_length + HUGE_PROMPT_MARGIN
        for chars_per_token in (TYPICAL_TOKEN_CHARS, self._max_token_chars):
            limit = needed * chars_per_token
            if len(prompt) <= limit:
                return
            head = len(self.model.tokenizer.encode(prompt[:limit], add_special_tokens=False))
            if head > needed:
                raise ContextLengthError(
                    f"the prompt ({len(prompt)} characters) is longer than the model's context of "
                    f"{self.context_length} tokens: its first {limit} characters alone are {head} tokens; shorten "
                    "the prompt",
                    "prompt",
                )

    @functools.cached_property
    def _max_token_chars(self) -> int:
        """Characters of the longest token in the vocabulary: a text of c characters is at least c / this many
        tokens (a byte-level token's string spells one character per byte)."""
        return max(map(len, self.model.tokenizer.get_vocab()), default=1)

    def _prompt_ids(self, request: SessionRequest) -> list[int]:
        text = prompts.ChatPrompt.build(self.model.tokenizer, request.names, request.prompt).text
        return self.model.tokenizer.encode(text, add_special_tokens=False)

    # ---- the loop -----------------------------------------------------------------------------------------

    def step(self) -> list[tuple[str, Event]]:
        """One batched forward over every running session; returns (session id, event) in generation order.

        A fault fails only the sessions it touched: one session's planning (its cache growing, say) fails that
        session; the forward fails the sessions in it. Every other session's events still come out this step."""
        failed: list[tuple[str, Event]] = []
        batch = []
        for session in self._scheduled():
            try:
                runs = session.runs()
                reserve_runs(session.cache, runs)
                batch.append((session, runs))
            except Exception as exc:
                log.exception("planning the next forward of session %s failed", session.id)
                failed += self._fail([session], exc)
        active = [(session, runs) for session, runs in batch if runs]
        if active:
            try:
                self._advance(active)
            except Exception as exc:
                log.exception("forward failed")
                failed += self._fail([session for session, _ in active], exc)
                batch = [(session, runs) for session, runs in batch if not runs]
            else:
                self._store_prompts([session for session, _ in active])
        events = [(session.id, event) for session, _ in batch for event in session.take_events()]
        for session, _ in batch:
            if session.done:
                self.cancel(session.id)
        return failed + events

    def _scheduled(self) -> list[Session]:
        """Every decoding session, plus the next prompt chunks of the oldest prefilling sessions while they fit in
        PREFILL_TOKENS_PER_STEP (always at least one): a burst of new requests neither stalls the sessions already
        decoding nor pays a whole step per short prompt.

        A session's first prefill starts after the prompt prefix the prefix cache holds. One whose next uncached
        page is still to be computed by an earlier session's prefill waits for it (pages are stored after every
        prefill forward, so usually one step) instead of computing it too: a burst of requests with the same rules
        computes them once.
        """
        in_flight = {
            key
            for sid, session in self._sessions.items()
            if session.is_prefilling and session.has_started
            for key in self._prompt_pages[sid].unstored
        }
        scheduled, budget = [], PREFILL_TOKENS_PER_STEP
        for session in self._sessions.values():
            if session.is_prefilling:
                if not session.has_started and self._waits_for_prefix(session, in_flight):
                    continue
                if session.next_prefill_tokens > budget and budget < PREFILL_TOKENS_PER_STEP:
                    continue
                budget -= session.next_prefill_tokens
                in_flight.update(self._prompt_pages[session.id].unstored)
            scheduled.append(session)
        return scheduled

    def _waits_for_prefix(self, session: Session, in_flight: set[bytes]) -> bool:
        """Before a session's first prefill: copies the prompt prefix the prefix cache holds into its cache, or
        returns True when its next page is in another session's prefill right now (then nothing is copied yet)."""
        keys = self._prompt_pages[session.id].keys
        usable = keys[: (session.prompt_len - 1) // PAGE_TOKENS]  # the prompt's last token is always computed
        hit = self.prefix_cache.cached_pages(usable)
        if hit < len(usable) and usable[hit] in in_flight:
            return True
        if hit:
            session.prompt_restored(self.prefix_cache.restore(usable[:hit], session.cache))
        return False

    def forward_logits(self, plan: ForwardPlan) -> torch.Tensor:
        """One forward of the model over `plan`: (K, V) logits, one row per run that wants them, in order."""
        m = self.model
        with torch.inference_mode():
            output = m.model(
                input_ids=plan.input_ids,
                position_ids=plan.position_ids,
                logits_to_keep=plan.logit_rows,
                use_cache=False,
                hogwild=plan,
                inv_freq=m.inv_freq,
            )
        return output.logits[0]

    def _advance(self, active: list[tuple[Session, list]]) -> None:
        m = self.model
        plan = build_forward([(s.cache, runs) for s, runs in active], m.inv_freq, m.dtype, self.attention)
        logits = self.graphs(plan) if self.graphs is not None else self.forward_logits(plan)
        # Every session samples on the device; the chosen tokens reach the host in one transfer, the step's only
        # wait for the device.
        picks, takers, row = [], [], 0
        for session, runs in active:
            count = sum(run.want_logits for run in runs)  # 0 for a long prompt's prefill chunk
            if count:
                params = GREEDY if session.is_finishing else session.request.sampling
                picks.append(sample(logits[row : row + count], params, self._generators[session.id]))
                takers.append((session, count))
            row += count
        tokens = torch.cat(picks).tolist() if picks else []
        row = 0
        for session, count in takers:
            session.commit(tokens[row : row + count])
            row += count

    def _store_prompts(self, sessions: list[Session]) -> None:
        """Hands the prompt pages a forward has just completed to the prefix cache. The cache is an optimisation:
        when it cannot get memory for a copy it is emptied, and the sessions go on."""
        for session in sessions:
            pages = self._prompt_pages.get(session.id)
            if pages is None:
                continue
            done = len(pages.keys) if not session.is_prefilling else session.prefilled_tokens // PAGE_TOKENS
            if done > pages.stored:
                try:
                    self.prefix_cache.store(pages.keys[:done], session.cache)
                except (torch.OutOfMemoryError, RuntimeError):  # a CPU allocation failure is a RuntimeError
                    log.warning("the prefix cache could not store a prompt; it is emptied", exc_info=True)
                    self.prefix_cache.clear()
                pages.stored = done
            if not session.is_prefilling:
                del self._prompt_pages[session.id]

    def _fail(self, sessions: list[Session], exc: Exception) -> list[tuple[str, Event]]:
        for session in sessions:
            self.cancel(session.id)
        message = f"generation failed: {type(exc).__name__}: {exc}"
        return [(session.id, ErrorEvent(message)) for session in sessions]

    def generate(self, request: SessionRequest) -> Iterator[Event]:
        """Runs one session alone to its end, yielding its events. Closing the iterator cancels it."""
        if self._sessions:
            raise RuntimeError("generate() runs one session alone; use add_session()/step() to batch sessions")
        session_id = uuid.uuid4().hex
        self.add_session(session_id, request)
        try:
            while session_id in self._sessions:
                for _, event in self.step():
                    yield event
        finally:
            self.cancel(session_id)
