"""The `hogwild` command: `serve` the HTTP API, `run` a session in this terminal, or stream one from a server
with `client`.

Only `run` loads the engine (and torch) into this process, and only once the subcommand starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import typing
from collections.abc import Callable, Sequence

import uvicorn
from pydantic import ValidationError
from sse_starlette.sse import AppStatus

from clients.cli_client import add_arguments as add_client_arguments
from clients.cli_client import run_client
from clients.lanes import LaneRenderer
from engine.config import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_REDUNDANCY_CHECK_EVERY,
    MAX_WORKERS,
    EngineConfig,
    SamplingParams,
    SessionRequest,
)
from engine.errors import HogwildError
from engine.events import AnswerEvent, DoneEvent, ErrorEvent, Event, InsertedEvent, StepEndEvent, TokenEvent
from service.settings import ENV_PREFIX, LOG_FORMAT, Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hogwild",
        description="Hogwild! Inference: several workers of one LLM solve a task together over one shared KV cache.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the HTTP API and the browser demo",
        description="Serve POST /v1/hogwild/completions (live SSE), /health, /v1/models, /metrics and the demo at /. "
        f"Every flag has an environment variable ({ENV_PREFIX}<FLAG>); flags win.",
    )
    _add_settings_flags(serve)
    serve.set_defaults(handler=serve_command)

    run = commands.add_parser(
        "run", help="run one session in this terminal, one lane per worker", description="Run one session in-process."
    )
    _add_session_flags(run)
    run.add_argument("--model", help=f'model to load (env {ENV_PREFIX}MODEL; default: "default", the embedded SmolLM2)')
    run.add_argument("--device", help=f"torch device (env {ENV_PREFIX}DEVICE; default: cuda if present, else cpu)")
    run.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help=f"dtype (env {ENV_PREFIX}DTYPE)")
    run.set_defaults(handler=run_command)

    client = commands.add_parser(
        "client", help="stream a session from a running server into terminal lanes", description="Stream from a server."
    )
    add_client_arguments(client)
    client.set_defaults(handler=client_command)
    return parser


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, so the flags and the environment variables can never drift apart."""
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        if name == "api_key" or shown in (None, ""):
            shown = "unset"
        choices = _literal_choices(field.annotation)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar=None if choices else name.upper(),
            choices=choices,
            default=None,
            help=f"{field.description} (env {ENV_PREFIX}{name.upper()}; default: {shown})",
        )


def _literal_choices(annotation: object) -> list[str] | None:
    """The allowed values of a Literal (or Optional Literal) annotation, else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is typing.Literal:
            return [str(value) for value in typing.get_args(candidate)]
    return None


def _add_session_flags(parser: argparse.ArgumentParser) -> None:
    sampling = SamplingParams()
    parser.add_argument("task", help="the task (prompt) the workers solve together")
    parser.add_argument(
        "--workers", type=int, help=f"number of workers, 1..{MAX_WORKERS} (default: one per --names, else 2)"
    )
    parser.add_argument("--names", help="comma-separated worker names, one per worker (default: Alice, Bob, ...)")
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="token budget per worker (default: %(default)s)"
    )
    parser.add_argument(
        "--temperature", type=float, default=sampling.temperature, help="0..2; 0 is greedy (default: %(default)s)"
    )
    parser.add_argument(
        "--top-p", type=float, default=sampling.top_p, help="nucleus sampling, (0, 1] (default: %(default)s)"
    )
    parser.add_argument(
        "--top-k", type=int, default=sampling.top_k, help="top-k sampling; 0 disables it (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    parser.add_argument(
        "--redundancy-check-every",
        type=int,
        default=DEFAULT_REDUNDANCY_CHECK_EVERY,
        help="generated tokens between 'am I doing redundant work?' checks; 0 disables them (default: %(default)s)",
    )
    parser.add_argument("--no-final-answer", action="store_true", help="do not force a final answer at the end")


def settings_problems(error: ValidationError) -> str:
    """One line per invalid setting, naming its variable and flag; never the value given (it may be the key)."""
    lines = []
    for problem in error.errors():
        name = ".".join(str(part) for part in problem["loc"])
        flag = "--" + name.replace("_", "-")
        lines.append(f"  {ENV_PREFIX}{name.upper()} / {flag}: {problem['msg']}")
    return "\n".join(lines)


def serve_command(args: argparse.Namespace) -> int:
    """Runs uvicorn until interrupted; prints the URL once the model is loaded. Exit 1 if it cannot load."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None}
    try:
        settings = Settings(**overrides)
        settings.engine_config()
    except ValidationError as error:
        print(f"hogwild serve: invalid settings:\n{settings_problems(error)}", file=sys.stderr)
        return EXIT_USAGE
    except HogwildError as error:
        print(f"hogwild serve: invalid settings: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    from service.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    for warning in Settings.unknown_variables(os.environ):
        logging.getLogger("hogwild.settings").warning("%s", warning)
    url = f"http://{settings.host}:{settings.port}"
    failures: list[str] = []
    server: uvicorn.Server | None = None

    def on_ready(model: str) -> None:
        print(f"hogwild: serving {model} at {url} (demo: {url}/, API: {url}/v1/hogwild/completions)", flush=True)

    def on_fatal(message: str) -> None:
        failures.append(message)
        print(f"hogwild: {message}", file=sys.stderr, flush=True)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_ready=on_ready, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    server = AbortingServer(config, abort=app.state.bridge.abort_all)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it has already handled by shutting down cleanly
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failures else EXIT_OK


class AbortingServer(uvicorn.Server):
    """A uvicorn server that, when asked to stop, first ends every session with finish_reason "abort": streams
    close with their finish chunks and [DONE], non-streamed requests answer with what was generated, and the
    server does not wait for long generations to run out."""

    def __init__(self, config: uvicorn.Config, abort: Callable[[], None]) -> None:
        super().__init__(config)
        self._abort = abort
        # Streams end through `abort` instead of being cancelled mid-frame by sse-starlette's own shutdown watcher.
        AppStatus.disable_automatic_graceful_drain()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._abort()
        await super().shutdown(sockets)


def run_command(args: argparse.Namespace) -> int:
    """Loads the engine in this process and renders one session's lanes live."""
    try:
        request = session_request_from_args(args)
        request.validate()
        config = EngineConfig.from_env(model=args.model, device=args.device, dtype=args.dtype)
    except HogwildError as error:
        print(f"hogwild run: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    from engine.engine import Engine  # torch loads here, for this subcommand only

    try:
        engine = Engine.load(config, progress=lambda message: print(message, file=sys.stderr, flush=True))
        renderer = LaneRenderer(list(request.names))
        return _render(engine.generate(request), renderer)
    except HogwildError as error:
        print(f"hogwild run: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _render(events: typing.Iterator[Event], renderer: LaneRenderer) -> int:
    for event in events:
        if isinstance(event, (TokenEvent, InsertedEvent, StepEndEvent, AnswerEvent)):
            renderer.feed(event.worker, event.kind, event.text)
        elif isinstance(event, DoneEvent):
            renderer.finish(event.answer, event.usage.to_dict())
            return EXIT_OK
        elif isinstance(event, ErrorEvent):
            print(f"hogwild run: {event.message}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


def session_request_from_args(args: argparse.Namespace) -> SessionRequest:
    names = tuple(name.strip() for name in args.names.split(",")) if args.names else None
    return SessionRequest(
        prompt=args.task,
        num_workers=args.workers if args.workers is not None else len(names) if names else 2,
        worker_names=names,
        max_tokens=args.max_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed),
        redundancy_check_every=args.redundancy_check_every,
        final_answer=not args.no_final_answer,
    )


def client_command(args: argparse.Namespace) -> int:
    return run_client(args)
