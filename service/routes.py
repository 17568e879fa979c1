"""HTTP routes: completions (streamed or not), health, models and metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.bridge import EngineBridge, EngineState
from service.collect import CompletionCollector
from service.errors import CLIENT_CLOSED_REQUEST, APIError, unavailable
from service.limits import TOO_LARGE_MESSAGE
from service.metrics import CONTENT_TYPE, Metrics
from service.schemas import CompletionRequest, CompletionResponse, ErrorResponse, ModelCard, ModelList
from service.session import SessionHandle
from service.settings import Settings
from service.streaming import ChunkWriter, SessionStream, stream_session

COMPLETIONS_PATH = "/v1/hogwild/completions"

ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid input (never 422)",
        401: "missing or wrong API key (only when HOGWILD_API_KEY is set)",
        404: "the requested model is not served",
        413: TOO_LARGE_MESSAGE,
        500: "the engine failed while generating",
        503: "queue full or engine not ready (with Retry-After)",
    }.items()
}

router = APIRouter()


def _bridge(request: Request) -> EngineBridge:
    return request.app.state.bridge


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


@router.post(
    COMPLETIONS_PATH,
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
    summary="Run one task on several workers that share one KV cache",
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Streams server-sent events when `stream` is true, else answers one JSON body. Every check that can fail
    before generation (including the prompt's length against the context) answers an error status first."""
    bridge, settings = _bridge(request), _settings(request)
    session_request = body.session_request(max_tokens_limit=settings.max_tokens, max_workers=settings.max_workers)
    if body.worker_names and "workers" not in body.model_fields_set and len(body.worker_names) > settings.max_workers:
        raise APIError(400, f"worker_names gives {session_request.num_workers} names, one per worker; at most "
                       f"{settings.max_workers} workers are allowed", "invalid_request", "worker_names")
    session_request.validate(max_workers=settings.max_workers, max_tokens=settings.max_tokens)
    if body.stream and body.return_views:
        raise APIError(400, "return_views comes with the non-streamed answer only; set stream to false",
                       "invalid_request", "return_views")
    if not body.stream and body.stream_options is not None:
        raise APIError(400, "stream_options is only allowed when stream is true", "invalid_request", "stream_options")
    if bridge.state is not EngineState.READY:
        raise unavailable(
            f"the engine is not ready ({bridge.state.value}): {bridge.status_message}", settings.retry_after_seconds
        )
    model = bridge.model_name or ""
    if body.model is not None and body.model != model:
        raise APIError(
            404, f"model {body.model!r} is not served here; this server serves {model!r}", "model_not_found", "model"
        )
    session = await bridge.open_session(session_request)
    created = int(time.time())
    if body.stream:
        writer = ChunkWriter(session.request_id, created, model, session_request.names, body.include_usage)
        events = stream_session(session, writer, settings.keepalive_seconds, _metrics(request).count_request)
        # A client that stops reading would hold its stream open, and everything its session still generates, for
        # as long as it stays connected: a write that waits send_timeout for it ends the stream and the session.
        return SessionStream(events, ping=0, sep="\n", send_timeout=settings.send_timeout_seconds)
    collector = CompletionCollector(
        session.request_id, created, model, session_request.names, settings.retry_after_seconds
    )
    return await _collect_unless_disconnected(session, collector, request)


async def _collect_unless_disconnected(
    session: SessionHandle, collector: CompletionCollector, request: Request
) -> Response:
    """Waits for the whole completion while watching the connection: a client that leaves cancels the session."""
    work = asyncio.ensure_future(collector.collect(session))
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()
        session.close()
    if not work.done() or work.cancelled():
        _metrics(request).count_request("cancelled")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = work.result().model_dump()  # raises the session's APIError, answered by the error handlers
    if body["views"] is None:
        del body["views"]
    _metrics(request).count_request("ok")
    return JSONResponse(body)


async def _until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.get(
    "/health",
    summary="200 when the model is loaded and the engine serves, else 503",
    responses={503: {"description": "the engine is starting, restarting or stopped (same body)"}},
)
@router.head("/health", include_in_schema=False)  # the same answer without a body; one operation id in the schema
async def health(request: Request) -> JSONResponse:
    bridge = _bridge(request)
    is_ready = bridge.state is EngineState.READY
    body = {
        "status": "ok" if is_ready else bridge.state.value,
        "model": bridge.model_name,
        "context_length": bridge.context_length,
        "engine_pid": bridge.engine_pid,
        "sessions_running": bridge.num_running,
        "sessions_waiting": bridge.num_waiting,
        "kv_cache_bytes": bridge.kv_cache_bytes,
        "prefix_cache_bytes": bridge.prefix_cache_bytes,
        "message": bridge.status_message,
    }
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="The served model")
@router.get(  # where an OpenAI SDK whose base URL is the completions' prefix looks for it
    "/v1/hogwild/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="The served model, again"
)
async def list_models(request: Request) -> ModelList:
    bridge = _bridge(request)
    if bridge.state is not EngineState.READY or bridge.model_name is None:
        raise unavailable(f"the engine is not ready ({bridge.state.value})", _settings(request).retry_after_seconds)
    return ModelList(data=[ModelCard(id=bridge.model_name, created=request.app.state.started_at)])


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
@router.head("/metrics", response_class=PlainTextResponse, include_in_schema=False)
async def metrics(request: Request) -> PlainTextResponse:
    bridge = _bridge(request)
    text = _metrics(request).render(
        bridge.num_running,
        bridge.num_waiting,
        bridge.state is EngineState.READY,
        kv_cache_bytes=bridge.kv_cache_bytes,
        prefix_cache_bytes=bridge.prefix_cache_bytes,
    )
    return PlainTextResponse(text, media_type=CONTENT_TYPE)
