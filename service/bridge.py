"""The API process's end of the engine: spawns the engine process, routes its replies to per-request sessions,
and restarts it when it dies.

Threading model: one reader thread per engine process blocks on the reply pipe and hands every reply to the event
loop with `call_soon_threadsafe`; all bridge and session state is touched on the event loop only. Nothing here
blocks the loop: spawning and joining the process run in the default executor, and `multiprocessing.Queue.put`
(commands) only appends to a buffer that a feeder thread writes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from engine.config import EngineConfig, SessionRequest
from engine.errors import LOAD_FAILED_PREFIX, ConfigurationError
from engine.events import DoneEvent, ErrorEvent, Event, TokenEvent
from service.engine_process import run_engine_process
from service.errors import APIError, unavailable
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
from service.metrics import Metrics
from service.session import SessionHandle
from service.settings import Settings

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

logger = logging.getLogger("hogwild.bridge")

POLL_SECONDS = 0.25  # how often the reader checks that the engine process is alive when no reply comes
RESTART_DELAY_SECONDS = 1.0
MAX_FAILED_STARTS = 3  # consecutive engine processes that died before becoming ready; then give up
STOP_TIMEOUT_SECONDS = 10.0
REAP_SECONDS = 1.0  # how long an exiting process (its pipe closed) gets to become reapable
EXIT_STATUS_WAIT_SECONDS = 1.0  # how long a process whose pipe closed gets to exit, so its exit status can be read
ENGINE_LOST_MESSAGE = "the engine process stopped unexpectedly; it is restarting, retry shortly"
ENGINE_STALLED_MESSAGE = "the engine stopped answering; it is restarting, retry shortly"
WATCH_SECONDS = 1.0  # how often the bridge checks that an engine with requests in flight still answers


class EngineState(enum.StrEnum):
    STOPPED = "stopped"
    LOADING = "loading"
    READY = "ready"
    DOWN = "down"  # the engine process died; a new one starts shortly
    FAILED = "failed"  # the model cannot be loaded; nothing will be retried


class EngineProcess:
    """One spawned engine process, its command queue, its reply pipe and the thread that reads the pipe.

    Only the child holds the pipe's write end (the parent closes its copy after the spawn), so when the engine
    process dies, even in the middle of a message, the reader gets EOF instead of waiting forever.
    """

    def __init__(self, config: EngineConfig, log_level: str = "info") -> None:
        context = multiprocessing.get_context("spawn")
        self._commands: Queue[Command] | None = context.Queue()
        self._replies, self._replies_writer = context.Pipe(duplex=False)
        self.process = context.Process(
            target=run_engine_process,
            args=(config, self._commands, self._replies_writer, log_level),
            name="hogwild-engine",
            daemon=True,
        )
        self._is_stopping = False
        self._reader: threading.Thread | None = None
        # The reader, the stopping thread and the event loop all ask for the exit status. Two threads reaping at
        # once leave the one that loses believing a reaped process alive (its waitpid fails), so reaping is
        # serialised; waiting for the process to end is not, so no thread holds the lock while it waits.
        self._reap_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def exit_code(self, wait_seconds: float = 0.0) -> int | None:
        """The process's exit code (negative: the signal that ended it), or None while it runs or before it
        started; waits up to `wait_seconds` for it to end. Safe from any thread."""
        if self.process.pid is None:
            return None
        if wait_seconds > 0:
            multiprocessing.connection.wait([self.process.sentinel], wait_seconds)
        with self._reap_lock:
            if self.process.exitcode is None and multiprocessing.connection.wait([self.process.sentinel], 0):
                # Its pipe closed as it exits: reapable a moment from now, unless the exit hangs in the kernel.
                deadline = time.monotonic() + REAP_SECONDS
                while self.process.exitcode is None and time.monotonic() < deadline:
                    time.sleep(0.005)
            return self.process.exitcode

    def is_alive(self) -> bool:
        return self.process.pid is not None and self.exit_code() is None

    def kill(self) -> None:
        with self._reap_lock:
            if self.process.pid is not None and self.process.exitcode is None:
                self.process.kill()

    def start(self, on_reply: Callable[[Reply], None], on_exit: Callable[[], None]) -> None:
        """Starts the process (blocking: spawn) and the reader thread that calls `on_reply` for every reply and
        `on_exit` once after the process is gone and its last replies were read."""
        try:
            self.process.start()
        finally:
            self._replies_writer.close()  # the child holds its own copy; without a child, nobody needs it
        self._reader = threading.Thread(
            target=self._read, args=(on_reply, on_exit), name="hogwild-engine-reader", daemon=True
        )
        self._reader.start()

    def send(self, command: Submit | Cancel | Shutdown) -> None:
        if self._commands is not None:  # else stopped: nothing sent matters any more
            self._commands.put(command)

    def stop(self, grace_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
        """Asks the engine to exit within `grace_seconds` (0: no asking), killing it if it does not (it ignores
        SIGTERM, see run_engine_process); then releases the channels. Blocking."""
        self._is_stopping = True
        if self.is_alive() and grace_seconds > 0:
            self.send(Shutdown())
            self.exit_code(grace_seconds)
        if self.is_alive():
            self.kill()
            self.exit_code(STOP_TIMEOUT_SECONDS)
            if self.is_alive():  # stuck in the kernel (a hung device driver): nothing more to do here
                logger.error("engine process %s did not exit %g s after SIGKILL", self.pid, STOP_TIMEOUT_SECONDS)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(POLL_SECONDS * 4)
        # Dropped here, the queue's semaphores are unlinked now instead of being reported as leaked at exit. Its
        # feeder thread holds two of them until it ends: after a clean exit the engine read every command up to
        # Shutdown, so the thread can flush and is waited for; after a kill it could block on a full pipe, so not.
        commands, self._commands = self._commands, None
        if commands is not None:
            commands.close()
            if self.exit_code() == 0:
                commands.join_thread()
            else:
                commands.cancel_join_thread()
        self._replies.close()

    def _read(self, on_reply: Callable[[Reply], None], on_exit: Callable[[], None]) -> None:
        """Hands every reply to `on_reply` until the process is gone (EOF, or dead with nothing left to read).
        While stopping, replies are still read (a busy engine blocked on a full pipe would never see Shutdown)
        but no longer handed on."""
        while True:
            try:
                if self._replies.poll(POLL_SECONDS):
                    reply = self._replies.recv()
                    if not self._is_stopping:
                        on_reply(reply)
                elif not self.is_alive():
                    break
            except (EOFError, OSError):  # the pipe closed: the process is exiting; its status tells how it ended
                self.exit_code(EXIT_STATUS_WAIT_SECONDS)
                break
            except Exception:  # a garbled reply means the engine cannot be trusted any more
                logger.exception("reading from the engine process failed; restarting it")
                break
        on_exit()


class EngineBridge:
    """Owns the engine process for the app's lifetime and turns requests into sessions.

    Invariants: `sessions` holds exactly the requests whose final message has not been delivered yet; at most
    `max_requests` of them exist at once; every message for a session comes from the current engine process.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        on_ready: Callable[[str], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.state = EngineState.STOPPED
        self.status_message = "the engine has not started"
        self.model_name: str | None = None
        self.context_length: int | None = None
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_bytes = 0
        self.prefix_cache_bytes = 0
        self._config = settings.engine_config()
        self._log_level = settings.log_level
        self._max_requests = settings.max_requests
        self._retry_after = settings.retry_after_seconds
        self._stall_seconds = settings.engine_stall_seconds
        self._replied_at = time.monotonic()  # the current engine's last reply (or when it became busy)
        self._stalled = False  # the current engine was killed for not answering
        self._on_ready = on_ready
        self._on_fatal = on_fatal
        self._sessions: dict[str, SessionHandle] = {}
        self._process: EngineProcess | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed_starts = 0
        self._is_stopping = False
        self._is_draining = False  # set by abort_all: the server is going down, new requests are refused
        self._tasks: set[asyncio.Future[object]] = set()

    @property
    def engine_pid(self) -> int | None:
        return self._process.pid if self._process is not None and self.state is not EngineState.DOWN else None

    async def start(self) -> None:
        """Spawns the engine process; returns at once (loading continues in the background)."""
        self._loop = asyncio.get_running_loop()
        await self._spawn()
        if self._stall_seconds:
            self._run_in_background(self._watch())

    async def stop(self) -> None:
        """Stops the engine process and fails whatever is still in flight."""
        self._is_stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._process is not None:
            # A loading engine reads no commands and has no session to end: asking it to exit would only wait out
            # the grace period, so it is killed at once.
            grace = STOP_TIMEOUT_SECONDS if self.state is EngineState.READY else 0.0
            await asyncio.get_running_loop().run_in_executor(None, self._process.stop, grace)
        self._fail_sessions("the server is shutting down", "engine_unavailable")
        self.state = EngineState.STOPPED

    async def open_session(self, request: SessionRequest) -> SessionHandle:
        """Submits a validated request and waits until the engine accepted it (the session is then queued or
        running). Raises APIError: 503 when not ready or full, 400 for failed checks."""
        if self._is_draining:
            raise unavailable("the server is shutting down", self._retry_after)
        if self.state is not EngineState.READY or self._process is None:
            raise unavailable(f"the engine is not ready ({self.state.value}): {self.status_message}", self._retry_after)
        if len(self._sessions) >= self._max_requests:
            raise APIError(
                503,
                "the server is at capacity; retry later",
                "queue_full",
                headers={"Retry-After": str(self._retry_after)},
            )
        session = SessionHandle(f"cmpl-{uuid.uuid4().hex}", request.num_workers, self.release)
        if not self._sessions:  # an idle engine owed nothing until now: its silence counts from here
            self._replied_at = time.monotonic()
        self._sessions[session.request_id] = session
        self._process.send(Submit(session.request_id, request))
        try:
            reply = await session.next_message()
        except asyncio.CancelledError:
            session.close()
            raise
        if isinstance(reply, Accepted):
            return session
        self._sessions.pop(session.request_id, None)
        if isinstance(reply, Rejected):
            raise APIError.from_code(reply.code, reply.message, reply.param, self._retry_after)
        if isinstance(reply, ErrorEvent):
            raise APIError.from_code(reply.code, reply.message, None, self._retry_after)
        raise unavailable("the server is shutting down", self._retry_after)  # aborted before it was accepted

    def abort_all(self) -> None:
        """Ends every session now (server shutdown): each gets a DoneEvent with finish_reason "abort", so streams
        close with their finish chunks and [DONE], and the engine cancels the work. No session opens after it."""
        self._is_draining = True
        for session in list(self._sessions.values()):
            self.release(session)
            session.deliver(session.aborted())

    def release(self, session: SessionHandle) -> None:
        """Forgets a session; if it had not finished, the engine cancels it."""
        if self._sessions.pop(session.request_id, None) is not None and self._process is not None:
            self._process.send(Cancel(session.request_id))

    async def _spawn(self) -> None:
        self.state = EngineState.LOADING
        self.status_message = "starting the engine process"
        process = EngineProcess(self._config, self._log_level)
        loop = asyncio.get_running_loop()
        on_reply = lambda reply: self._threadsafe(self._dispatch, process, reply)  # noqa: E731
        on_exit = lambda: self._threadsafe(self._on_exit, process)  # noqa: E731
        self._process = process
        await loop.run_in_executor(None, process.start, on_reply, on_exit)
        logger.info("engine process %s started, loading %s", process.pid, self._config.model)

    def _threadsafe(self, callback: Callable[..., None], *args: object) -> None:
        """Runs `callback` on the event loop; called from the reader thread."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown; nobody waits for this reply
            self._loop.call_soon_threadsafe(callback, *args)

    def _dispatch(self, process: EngineProcess, reply: Reply) -> None:
        if process is not self._process or self._is_stopping:
            return
        self._replied_at = time.monotonic()
        if isinstance(reply, StepEvents):
            self._route_events(reply.events)
        elif isinstance(reply, Occupancy):
            self.num_running, self.num_waiting = reply.num_running, reply.num_waiting
            self.kv_cache_bytes, self.prefix_cache_bytes = reply.kv_cache_bytes, reply.prefix_cache_bytes
        elif isinstance(reply, (Accepted, Rejected)):
            session = self._sessions.get(reply.request_id)
            if session is not None:
                session.deliver(reply)
        elif isinstance(reply, LoadProgress):
            self.status_message = reply.message
            logger.info("engine: %s", reply.message)
        elif isinstance(reply, Ready):
            self._become_ready(reply)
        elif isinstance(reply, LoadFailed):
            named = reply.message.startswith(LOAD_FAILED_PREFIX) or reply.code == ConfigurationError.code
            self._give_up(reply.message if named else f"{LOAD_FAILED_PREFIX} {self._config.model!r}: {reply.message}")

    def _route_events(self, events: list[tuple[str, Event]]) -> None:
        now = time.monotonic()
        sampled: dict[str, SessionHandle] = {}
        for request_id, event in events:
            if isinstance(event, TokenEvent):
                self.metrics.generated_tokens += len(event.token_ids)
            session = self._sessions.get(request_id)
            if session is None:
                continue  # cancelled; its last events were already in flight
            if isinstance(event, TokenEvent):
                sampled[request_id] = session
            if isinstance(event, DoneEvent):
                self.metrics.generated_tokens += session.silent_tokens(event.usage)
                self.metrics.prompt_tokens += event.usage.prompt_tokens
                self.metrics.cached_prompt_tokens += event.usage.cached_prompt_tokens
            if isinstance(event, (DoneEvent, ErrorEvent)):
                del self._sessions[request_id]
            session.deliver(event)
        for session in sampled.values():
            session.mark_tokens(now, self.metrics)

    def _become_ready(self, ready: Ready) -> None:
        self.state = EngineState.READY
        self.model_name = ready.model_name
        self.context_length = ready.context_length
        self.status_message = "ready"
        self._failed_starts = 0
        logger.info("engine ready: %s (context %d tokens)", ready.model_name, ready.context_length)
        if self._on_ready is not None:
            self._on_ready(ready.model_name)

    def _give_up(self, message: str) -> None:
        self.state = EngineState.FAILED
        self.status_message = message
        logger.error("%s", message)
        self._fail_sessions(message, "engine_unavailable")
        if self._on_fatal is not None:
            self._on_fatal(message)

    async def _watch(self) -> None:
        """Kills a ready engine that has not answered for `engine_stall_seconds` while requests are in flight (a
        busy engine replies at least every second, engine_process.HEARTBEAT_SECONDS): a hung device call or
        deadlock then fails its requests and restarts it (`_on_exit`), instead of holding them, and /health's 200,
        forever."""
        ticked = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            now = time.monotonic()
            if now - ticked > 3 * WATCH_SECONDS:  # this process was frozen too (a paused container, a suspended
                self._replied_at = now  # VM): the engine's replies may be waiting in the pipe; count afresh
            ticked = now
            process, silent = self._process, now - self._replied_at
            if process is None or self.state is not EngineState.READY or not self._sessions or self._stalled:
                continue
            if silent >= self._stall_seconds:
                self._stalled = True
                logger.error(
                    "engine process %s has not answered for %.0f s with %d requests in flight; killing it",
                    process.pid, silent, len(self._sessions),
                )
                await asyncio.get_running_loop().run_in_executor(None, process.kill)
                self._run_in_background(self._unless_gone(process))

    async def _unless_gone(self, process: EngineProcess) -> None:
        """A process stuck in the kernel (a hung device driver) outlives SIGKILL: its requests fail anyway, and
        /health reports it, instead of waiting for an exit that may never come. Should it exit later, the usual
        restart follows."""
        await asyncio.sleep(STOP_TIMEOUT_SECONDS)
        if process is self._process and self.state is EngineState.READY and self._stalled:
            how = f"stopped answering and did not exit {STOP_TIMEOUT_SECONDS:g} s after SIGKILL"
            self.state = EngineState.DOWN
            self.status_message = f"the engine process {how}"
            logger.error("engine process %s %s", process.pid, how)
            self._fail_sessions(ENGINE_STALLED_MESSAGE, "engine_unavailable")

    def _on_exit(self, process: EngineProcess) -> None:
        if process is not self._process or self._is_stopping or self.state is EngineState.FAILED:
            return
        was_ready = self.state is EngineState.READY or self._stalled
        how = "stopped answering and was killed" if self._stalled else exit_description(process.exit_code())
        self.state = EngineState.DOWN
        self.status_message = f"the engine process {how}; restarting"
        logger.error("engine process %s %s", process.pid, how)
        self._fail_sessions(ENGINE_STALLED_MESSAGE if self._stalled else ENGINE_LOST_MESSAGE, "engine_unavailable")
        self._stalled = False
        # Gone, or alive but no longer read (a garbled reply): either way it is killed, not asked, and the new
        # engine starts only once the old one has exited, so two never hold the model (and the GPU) at once.
        stopped = asyncio.get_running_loop().run_in_executor(None, process.stop, 0.0)
        self._run_in_background(stopped)
        if not was_ready:
            self._failed_starts += 1
            if self._failed_starts >= MAX_FAILED_STARTS:
                self._give_up(f"the engine process exited {self._failed_starts} times while loading the model")
                return
        self.metrics.engine_restarts += 1
        self._run_in_background(self._restart(stopped))

    async def _restart(self, stopped: Awaitable[object]) -> None:
        _, failure = await asyncio.gather(asyncio.sleep(RESTART_DELAY_SECONDS), stopped, return_exceptions=True)
        if isinstance(failure, Exception):  # the new engine starts anyway: the old one is gone or beyond reach
            logger.error("stopping the lost engine process failed: %s: %s", type(failure).__name__, failure)
        if self._is_stopping or self._is_draining:  # the server is going down: no engine to load for it
            return
        try:
            await self._spawn()
        except Exception as error:  # out of processes or file descriptors: nothing to wait for
            logger.exception("starting a new engine process failed")
            if self._process is not None:
                self._run_in_background(asyncio.get_running_loop().run_in_executor(None, self._process.stop))
            self._give_up(f"a new engine process could not start: {type(error).__name__}: {error}")

    def _run_in_background(self, awaitable: Awaitable[object]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_sessions(self, message: str, code: str) -> None:
        failed = list(self._sessions.values())
        self._sessions.clear()
        self.num_running = self.num_waiting = self.kv_cache_bytes = self.prefix_cache_bytes = 0
        for session in failed:
            session.deliver(ErrorEvent(message, code))


def exit_description(exit_code: int | None) -> str:
    """How a process ended, from multiprocessing's exitcode (negative: killed by that signal; None: its pipe
    closed before the exit status could be read)."""
    if exit_code is None:
        return "stopped"
    if exit_code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exit_code).name}"
    return f"exited with code {exit_code}"
