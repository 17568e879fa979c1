"""The engine process: loads the model, then admits, steps and cancels sessions on behalf of the API process.

This module is imported by both processes, so it imports torch only inside `run_engine_process`, which runs in
the spawned child. The loop reads top to bottom:

    drain commands (block only when nothing runs) -> admit waiting requests -> one engine step -> forward events
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.errors import CapacityError, ConfigurationError, HogwildError
from engine.events import DoneEvent, ErrorEvent
from service.messages import (
    Accepted,
    Cancel,
    Command,
    LoadFailed,
    LoadProgress,
    Occupancy,
    Ready,
    Rejected,
    Reply,
    Shutdown,
    StepEvents,
    Submit,
)
from service.settings import LOG_FORMAT

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.queues import Queue

    from engine.engine import CheckedRequest, Engine

logger = logging.getLogger("hogwild.engine_process")

PARENT_CHECK_SECONDS = 1.0  # how often an idle engine checks that the API process still lives
HEARTBEAT_SECONDS = 1.0  # a busy engine replies at least this often (its occupancy, changed or not): the API
# process takes a long silence while requests are in flight for a hung engine (Settings.engine_stall_seconds)
STEP_FAILED_MESSAGE = "the engine failed while generating; the session was stopped"
ADMIT_FAILED_MESSAGE = "the engine could not start the session"


def run_engine_process(
    config: EngineConfig, commands: Queue[Command], replies: Connection, log_level: str = "info"
) -> None:
    """Entry point of the spawned engine process. Sends `Ready` or `LoadFailed`, then serves until `Shutdown`
    arrives or the API process goes away."""
    # Ctrl+C, and a service manager's SIGTERM, reach the whole process group; the API process stops this one itself
    # after ending its sessions with "abort" (Shutdown, then SIGKILL if it must). An orphaned engine notices that
    # its pipe or its parent is gone and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    _thread_locked_progress_bars()
    from engine.engine import Engine  # torch is imported here, in the engine process only

    try:
        engine = Engine.load(config, progress=lambda message: replies.send(LoadProgress(message)))
    except HogwildError as error:
        replies.send(LoadFailed(error.code, error.message))
        return
    except Exception as error:  # any load fault must reach the user as a message
        logger.exception("loading the model failed")
        replies.send(LoadFailed("load_failed", f"loading the model failed: {type(error).__name__}: {error}"))
        return
    try:
        replies.send(LoadProgress("warming up: a first short session"))
        try:
            engine.warm_up()
        except ConfigurationError as error:  # the settings (or the model's context) leave no room for a session
            replies.send(LoadFailed(error.code, error.message))
            return
        except Exception as error:  # a model that cannot run a short session cannot serve
            logger.exception("the warm-up session failed")
            message = f"the model failed its first session: {type(error).__name__}: {error}"
            replies.send(LoadFailed("load_failed", message))
            return
        replies.send(Ready(engine.model_name, engine.context_length))
        EngineLoop(engine, commands, replies).run()
    except (BrokenPipeError, EOFError):
        logger.info("the API process is gone; the engine stops")


def _thread_locked_progress_bars() -> None:
    """Progress bars (loading weights, hub downloads) guard their output with a multiprocessing lock by default: a
    named semaphore registered with the API process's resource tracker, which a killed engine never unregisters
    (the server then warns of a leaked semaphore at exit). This process draws its bars from its own threads only,
    so a thread lock guards them as well."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


class EngineLoop:
    """Admits, steps and cancels the sessions of one engine.

    Invariants: every `Submit` gets exactly one `Accepted` or `Rejected` before any of its events; a request id is
    in at most one of `waiting` (accepted, FIFO, not yet in the engine) and `running` (admitted to the engine);
    it leaves `running` when its DoneEvent or ErrorEvent is forwarded or when it is cancelled.
    """

    def __init__(self, engine: Engine, commands: Queue[Command], replies: Connection) -> None:
        self.engine = engine
        self.commands = commands
        self.replies = replies
        self.waiting: OrderedDict[str, CheckedRequest] = OrderedDict()
        self.running: set[str] = set()
        self._reported = Occupancy(0, 0)
        self._sent_at = time.monotonic()

    def run(self) -> None:
        self._report_occupancy()  # what the engine already holds (the warm-up's prefix pages) before any request
        while True:
            is_idle = not self.running and not self.waiting
            for command in self._receive(block=is_idle):
                if isinstance(command, Shutdown):
                    return
                self._handle(command)
            self._admit()
            self._report_occupancy()  # before a first prefill that may take seconds
            if self.running:
                self._step()
            self._report_occupancy()

    def _receive(self, block: bool) -> list[Command]:
        """All pending commands; when `block`, waits for at least one (or returns [Shutdown()] if the API
        process died, so an orphaned engine never lingers)."""
        received: list[Command] = []
        while block and not received:
            try:
                received.append(self.commands.get(timeout=PARENT_CHECK_SECONDS))
            except queue.Empty:
                parent = multiprocessing.parent_process()
                if parent is not None and not parent.is_alive():
                    return [Shutdown()]
        while True:
            try:
                received.append(self.commands.get_nowait())
            except queue.Empty:
                return received

    def _handle(self, command: Submit | Cancel) -> None:
        if isinstance(command, Submit):
            self._check(command)
        elif command.request_id in self.waiting:
            del self.waiting[command.request_id]
        elif command.request_id in self.running:
            self.running.discard(command.request_id)
            self.engine.cancel(command.request_id)

    def _check(self, submit: Submit) -> None:
        try:
            checked = self.engine.checked(submit.request)
        except HogwildError as error:
            self._send(Rejected(submit.request_id, error.code, error.message, error.param))
            return
        except Exception:  # a fault in one request's check must not stop the engine
            logger.exception("checking request %s failed", submit.request_id)
            self._send(
                Rejected(submit.request_id, "engine_error", "the engine could not check the request", None)
            )
            return
        self.waiting[submit.request_id] = checked  # admitted later without checking (tokenizing) it again
        self._send(Accepted(submit.request_id, checked.prompt_tokens))

    def _admit(self) -> None:
        """Moves waiting requests into the engine, oldest first, while it has room."""
        while self.waiting and self.engine.num_running < self.engine.config.max_sessions:
            request_id, request = next(iter(self.waiting.items()))
            try:
                self.engine.add_session(request_id, request)
            except CapacityError as error:
                if self.running:
                    return  # retried after a running session frees its cache
                self._fail_waiting(request_id, error.message, error.code)
                continue
            except HogwildError as error:
                self._fail_waiting(request_id, error.message, error.code)
                continue
            except Exception:
                logger.exception("admitting request %s failed", request_id)
                self._fail_waiting(request_id, ADMIT_FAILED_MESSAGE, "engine_error")
                continue
            del self.waiting[request_id]
            self.running.add(request_id)

    def _fail_waiting(self, request_id: str, message: str, code: str) -> None:
        del self.waiting[request_id]
        self._send(StepEvents([(request_id, ErrorEvent(message, code))]))

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception:  # fail the running sessions, keep serving new ones
            logger.exception("engine step failed")
            self._fail_running()
            return
        for request_id, event in events:
            if isinstance(event, (DoneEvent, ErrorEvent)):
                self.running.discard(request_id)
        if events:
            self._send(StepEvents(events))

    def _fail_running(self) -> None:
        failed = sorted(self.running)
        self.running.clear()
        for request_id in failed:
            try:
                self.engine.cancel(request_id)
            except Exception:
                logger.exception("cancelling request %s after a failed step failed", request_id)
        self._send(StepEvents([(request_id, ErrorEvent(STEP_FAILED_MESSAGE)) for request_id in failed]))

    def _send(self, reply: Reply) -> None:
        self.replies.send(reply)
        self._sent_at = time.monotonic()

    def _report_occupancy(self) -> None:
        """Sends the occupancy when it changed, or as the heartbeat of an engine with work that has said nothing
        for HEARTBEAT_SECONDS (a long prompt's prefill steps produce no events)."""
        engine = self.engine
        occupancy = Occupancy(len(self.running), len(self.waiting), engine.cache_bytes, engine.prefix_cache_bytes)
        is_busy = bool(self.running or self.waiting)
        if occupancy != self._reported or (is_busy and time.monotonic() - self._sent_at >= HEARTBEAT_SECONDS):
            self._send(occupancy)
            self._reported = occupancy
