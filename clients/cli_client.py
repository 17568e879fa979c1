"""`hogwild client "task"`: stream a session from a running server into terminal lanes.

Exit codes: 0 when the session ran to its end, 1 when the server refused, failed or aborted it (a server that
shuts down aborts its sessions) or could not be reached (the message is printed, never a traceback), 130 when
interrupted (the session is cancelled).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from clients.client import DEFAULT_URL, HogwildClient
from clients.errors import HogwildClientError
from clients.lanes import KINDS as LANE_KINDS
from clients.lanes import LaneRenderer
from clients.results import StreamEvent

DEFAULT_NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi")  # the protocol's defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the client's arguments; defaults left as None take the server's defaults."""
    parser.add_argument("task", help="the task (prompt) the workers solve together")
    parser.add_argument(
        "--url",
        default=os.environ.get("HOGWILD_URL", DEFAULT_URL),
        help=f"server base URL (env HOGWILD_URL; default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="number of workers (default: one per --names, else 2)"
    )
    parser.add_argument("--names", default=None, help="comma-separated worker names, one per worker")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget per worker")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--redundancy-check-every", type=int, default=None, help="tokens between redundancy checks (0: off)"
    )
    parser.add_argument("--no-final-answer", action="store_true", help="do not force a final answer at the end")
    parser.add_argument(
        "--api-key", default=os.environ.get("HOGWILD_API_KEY"), help="sent as a Bearer token (env HOGWILD_API_KEY)"
    )
    parser.add_argument("--plain", action="store_true", help="line-prefixed output even on a terminal")


def run_client(args: argparse.Namespace) -> int:
    """Streams one session into lanes; returns the exit code."""
    given_names = [n.strip() for n in args.names.split(",")] if args.names else None
    workers = args.workers if args.workers is not None else len(given_names or DEFAULT_NAMES[:2])
    options = {
        "workers": workers,
        "worker_names": given_names,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "redundancy_check_every": args.redundancy_check_every,
        "final_answer": False if args.no_final_answer else None,
    }
    try:
        with HogwildClient(args.url, api_key=args.api_key) as client:
            return _stream(client, args.task, options, given_names or default_names(workers), args.plain)
    except HogwildClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the session was cancelled", file=sys.stderr)
        return 130


def _stream(client: HogwildClient, task: str, options: dict[str, object], names: list[str], plain: bool) -> int:
    renderer = LaneRenderer(names, sys.stdout, is_tty=False if plain else None)
    usage: dict[str, object] | None = None
    aborted = False
    with client.stream(task, include_usage=True, **options) as events:
        for event in events:
            aborted |= event.kind == "finish" and event.finish_reason == "abort"
            if event.kind == "usage" and event.usage is not None:
                usage = dataclasses.asdict(event.usage)  # back to the server's shape, which the summary reads
                usage["prompt_tokens_details"] = {"cached_tokens": usage.pop("cached_tokens")}
            elif event.worker is not None and event.kind in LANE_KINDS:
                renderer.feed(event.worker, event.kind, _lane_text(event))
    renderer.finish(None, usage)  # the answer, if any, came as an "answer" event
    if aborted:
        print("error: the server stopped the session before its end (finish_reason abort)", file=sys.stderr)
        return 1
    return 0


def default_names(count: int) -> list[str]:
    """The server's default worker names, in order; numbered names past the eighth."""
    return [DEFAULT_NAMES[i] if i < len(DEFAULT_NAMES) else f"Worker {i + 1}" for i in range(count)]


def _lane_text(event: StreamEvent) -> str:
    if event.kind == "step_end":
        return event.step_text or ""
    if event.kind == "answer":
        return event.answer or ""
    return event.text
