"""The engine process's scheduling loop, driven with a scripted stand-in for the engine.

The loop's contract (accept/reject before events, FIFO admission under a limit, cancellation, surviving a failed
step) does not depend on the model, and a failing step cannot be provoked on demand with a real one. The real
engine runs behind the loop in tests/test_service_api.py and tests/test_service_lifecycle.py.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import pytest

from engine.config import EngineConfig, SessionRequest
from engine.engine import CheckedRequest
from engine.errors import CapacityError, InvalidRequestError
from engine.events import DoneEvent, ErrorEvent, Event, TokenEvent, Usage
from service.engine_process import ADMIT_FAILED_MESSAGE, STEP_FAILED_MESSAGE, EngineLoop
from service.messages import Accepted, Cancel, Occupancy, Rejected, Shutdown, StepEvents, Submit

SESSION_BYTES = 1000  # the scripted engine's cache per running session
OPENING_TOKENS = 3  # the scripted engine's labels and first-step openings per session


class ScriptedEngine:
    """Each session samples one token per step for its one worker, `max_tokens` steps long. Prompt "bad" fails
    the check, "huge" never fits, "wide" fits only while no other session runs; "check-fault" and "admit-fault"
    raise unexpected errors there; `fail_steps` makes that many next steps raise."""

    prefix_cache_bytes = 0

    def __init__(self) -> None:
        self.sessions: dict[str, list[int]] = {}  # id -> [tokens so far, budget]
        self.fail_steps = 0

    @property
    def cache_bytes(self) -> int:
        return SESSION_BYTES * len(self.sessions)

    @property
    def num_running(self) -> int:
        return len(self.sessions)

    def checked(self, request: SessionRequest) -> CheckedRequest:
        if request.prompt == "bad":
            raise InvalidRequestError("bad prompt", "prompt")
        if request.prompt == "check-fault":
            raise KeyError("tokenizer state")
        prompt_ids = tuple(range(len(request.prompt)))
        return CheckedRequest(
            request, prompt_ids, len(prompt_ids), len(prompt_ids) + OPENING_TOKENS, 1, len(prompt_ids) + 1
        )

    def add_session(self, session_id: str, checked: CheckedRequest) -> None:
        request = checked.request
        if request.prompt == "huge" or (request.prompt == "wide" and self.sessions):
            raise CapacityError("does not fit")
        if request.prompt == "admit-fault":
            raise RuntimeError("allocator fault")
        self.sessions[session_id] = [0, request.max_tokens]

    def cancel(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def step(self) -> list[tuple[str, Event]]:
        time.sleep(0.001)  # a step takes time, as a real one does: a long session does not flood the replies
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("device lost")
        events: list[tuple[str, Event]] = []
        for session_id, progress in list(self.sessions.items()):
            progress[0] += 1
            events.append((session_id, TokenEvent(worker=0, step=1, text="x", token_ids=(1,))))
            if progress[0] == progress[1]:
                usage = Usage(prompt_tokens=1, completion_tokens_per_worker=(progress[0],), steps_per_worker=(1,))
                events.append((session_id, DoneEvent(usage=usage, finish_reasons=("length",), answer=None)))
                del self.sessions[session_id]
        return events


class Outbox(queue.Queue):
    """Stands in for the reply pipe's write end."""

    def send(self, reply: object) -> None:
        self.put(reply)


class Harness:
    """Runs an EngineLoop in a thread over in-process queues; `send` commands, read replies until a condition."""

    def __init__(self, engine: ScriptedEngine, max_sessions: int = 2) -> None:
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.outbox = Outbox()
        self.replies: list = []
        engine.config = EngineConfig(max_sessions=max_sessions)
        loop = EngineLoop(engine, self.inbox, self.outbox)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=loop.run)

    def __enter__(self) -> Harness:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.inbox.put(Shutdown())
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()

    def send(self, *commands: object) -> None:
        for command in commands:
            self.inbox.put(command)

    def until(self, is_done: Callable[[list], bool], timeout: float = 10.0) -> list:
        """All replies so far, once `is_done(replies)` holds; fails after `timeout` seconds without it."""
        deadline = time.monotonic() + timeout
        while not is_done(self.replies):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"the loop's replies did not reach the expected state in {timeout} s")
            self.replies.append(self.outbox.get(timeout=left))
        return self.replies


def ended(request_id: str) -> Callable[[list], bool]:
    return lambda replies: any(
        rid == request_id and isinstance(event, (DoneEvent, ErrorEvent)) for rid, event in events_of(replies)
    )


def request(prompt: str = "task", max_tokens: int = 3) -> SessionRequest:
    return SessionRequest(prompt=prompt, num_workers=1, max_tokens=max_tokens)


def events_of(replies: list) -> list[tuple[str, Event]]:
    return [pair for reply in replies if isinstance(reply, StepEvents) for pair in reply.events]


def test_every_submit_is_answered_before_its_events() -> None:
    with Harness(ScriptedEngine()) as harness:
        harness.send(Submit("a", request()), Submit("b", request("bad")))
        replies = harness.until(ended("a"))
    assert replies[0] == Accepted("a", 4 + OPENING_TOKENS)  # usage's prompt tokens: chat prompt and openings
    assert replies[1] == Rejected("b", "invalid_request", "bad prompt", "prompt")
    events = events_of(replies)
    assert [request_id for request_id, _ in events] == ["a"] * 4
    assert isinstance(events[-1][1], DoneEvent)


def test_the_caches_held_before_any_request_are_reported_at_once() -> None:
    engine = ScriptedEngine()
    engine.prefix_cache_bytes = 4096  # say, the warm-up session's prompt pages
    with Harness(engine) as harness:
        replies = harness.until(lambda replies: len(replies) > 0)
    assert replies[0] == Occupancy(0, 0, 0, 4096)


def test_an_admitted_session_is_reported_before_its_first_step() -> None:
    """A first prefill can take seconds; /health must count the session as running meanwhile."""
    with Harness(ScriptedEngine()) as harness:
        harness.send(Submit("a", request()))
        replies = harness.until(ended("a"))
    first_step = next(i for i, reply in enumerate(replies) if isinstance(reply, StepEvents))
    assert Occupancy(1, 0, SESSION_BYTES) in replies[:first_step]


def test_waiting_requests_are_admitted_in_order_within_the_running_limit() -> None:
    with Harness(ScriptedEngine(), max_sessions=1) as harness:
        harness.send(*[Submit(name, request()) for name in "abc"])
        replies = harness.until(ended("c"))
    order = [request_id for request_id, event in events_of(replies) if isinstance(event, TokenEvent)]
    assert order == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    occupancies = [reply for reply in replies if isinstance(reply, Occupancy)]
    assert occupancies[0] == Occupancy(1, 2, SESSION_BYTES)  # the running session's cache is reported
    assert max(o.num_running for o in occupancies) == 1


def test_cancel_drops_a_waiting_request_and_stops_a_running_one() -> None:
    engine = ScriptedEngine()
    with Harness(engine, max_sessions=1) as harness:
        harness.send(Submit("a", request(max_tokens=10**9)), Submit("b", request()))
        harness.until(lambda replies: Occupancy(1, 1, SESSION_BYTES) in replies)
        harness.send(Cancel("b"), Cancel("a"))
        replies = harness.until(lambda replies: replies[-1] == Occupancy(0, 0))
        assert engine.sessions == {}
        harness.send(Submit("c", request()))
        replies = harness.until(ended("c"))
    idle_at = replies.index(Occupancy(0, 0))
    assert all(rid == "c" for reply in replies[idle_at:] if isinstance(reply, StepEvents) for rid, _ in reply.events)
    assert not any(rid == "b" for rid, _ in events_of(replies))


def test_a_failing_step_errors_its_sessions_and_the_loop_keeps_serving() -> None:
    engine = ScriptedEngine()
    engine.fail_steps = 1
    with Harness(engine) as harness:
        harness.send(Submit("a", request()), Submit("b", request()))
        replies = harness.until(lambda replies: ended("a")(replies) and ended("b")(replies))
        assert events_of(replies) == [("a", ErrorEvent(STEP_FAILED_MESSAGE)), ("b", ErrorEvent(STEP_FAILED_MESSAGE))]
        assert engine.sessions == {}
        harness.send(Submit("c", request()))
        replies = harness.until(ended("c"))
    assert isinstance(events_of(replies)[-1][1], DoneEvent)


def test_a_request_that_can_never_fit_fails_instead_of_waiting_forever() -> None:
    with Harness(ScriptedEngine()) as harness:
        harness.send(Submit("a", request("huge")))
        replies = harness.until(ended("a"))
    assert replies[0] == Accepted("a", 4 + OPENING_TOKENS)  # usage's prompt tokens: chat prompt and openings
    assert events_of(replies) == [("a", ErrorEvent("does not fit", "capacity_exceeded"))]


def test_a_request_that_fits_only_later_waits_for_the_running_sessions_to_free_their_cache() -> None:
    with Harness(ScriptedEngine(), max_sessions=4) as harness:
        harness.send(Submit("a", request(max_tokens=10**9)))
        harness.until(lambda replies: Occupancy(1, 0, SESSION_BYTES) in replies)
        harness.send(Submit("wide", request("wide", max_tokens=2)), Submit("b", request(max_tokens=2)))
        harness.until(lambda replies: Occupancy(1, 2, SESSION_BYTES) in replies)  # both wait behind "wide"
        harness.send(Cancel("a"))
        replies = harness.until(lambda replies: ended("wide")(replies) and ended("b")(replies))
    events = events_of(replies)
    assert not any(isinstance(event, ErrorEvent) for _, event in events)
    wide = [event for rid, event in events if rid == "wide"]
    assert len(wide) == 3 and isinstance(wide[-1], DoneEvent)  # 2 tokens, then done
    order = [rid for rid, _ in events if rid != "a"]
    assert order[0] == "wide"  # admission stays in order: "b" does not overtake the waiting "wide"


def test_unexpected_faults_in_checking_or_admitting_fail_only_that_request() -> None:
    with Harness(ScriptedEngine()) as harness:
        harness.send(Submit("a", request("check-fault")), Submit("b", request("admit-fault")))
        replies = harness.until(ended("b"))
        assert replies[0] == Rejected("a", "engine_error", "the engine could not check the request", None)
        assert events_of(replies) == [("b", ErrorEvent(ADMIT_FAILED_MESSAGE, "engine_error"))]
        harness.send(Submit("c", request()))
        replies = harness.until(ended("c"))
    assert isinstance(events_of(replies)[-1][1], DoneEvent)


class SilentSteps(ScriptedEngine):
    """Steps that take 0.2 s and produce no events (a long prompt's prefill chunks), for as long as it runs."""

    def step(self) -> list[tuple[str, Event]]:
        time.sleep(0.2)
        return []


def test_a_busy_engine_whose_steps_say_nothing_still_replies_every_heartbeat() -> None:
    """The API process takes a long silence with requests in flight for a hung engine, so a busy engine
    reports its (unchanged) occupancy at least every HEARTBEAT_SECONDS; an idle one says nothing."""
    with Harness(SilentSteps()) as harness:
        harness.send(Submit("a", request(max_tokens=1000)))
        start = time.monotonic()
        replies = harness.until(lambda replies: time.monotonic() - start > 3.5, timeout=6)
    beats = [reply for reply in replies if isinstance(reply, Occupancy)]
    assert beats[-1] == Occupancy(1, 0, SESSION_BYTES, 0)
    assert beats.count(beats[-1]) >= 3, "the same occupancy again, about once a second"
    with Harness(ScriptedEngine()) as idle:
        time.sleep(2.5)
        assert idle.outbox.qsize() == 0  # nothing runs or waits, so it owes no answer


class WarmUpFails:
    """An engine that loads but cannot run a session."""

    model_name, context_length = "broken", 128

    def warm_up(self) -> None:
        raise RuntimeError("CUDA error: no kernel image is available")


def test_a_model_that_fails_its_warm_up_session_is_reported_as_a_failed_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    from engine.config import EngineConfig
    from engine.engine import Engine
    from service.engine_process import run_engine_process
    from service.messages import LoadFailed, LoadProgress

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, config, progress=None: WarmUpFails()))
    receive, send = multiprocessing.Pipe(duplex=False)
    run_engine_process(EngineConfig(), queue.Queue(), send)  # returns without serving
    replies = []
    while receive.poll():
        replies.append(receive.recv())
    assert isinstance(replies[0], LoadProgress) and "warming up" in replies[0].message
    assert isinstance(replies[-1], LoadFailed) and replies[-1].code == "load_failed"
    assert "failed its first session" in replies[-1].message and "no kernel image" in replies[-1].message
