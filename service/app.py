"""The FastAPI application: routes, error handlers, API key, CORS, the browser demo, and the engine's lifetime."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse

from service.auth import PROTECTED_PREFIX, ApiKeyMiddleware
from service.bridge import EngineBridge
from service.errors import APIError, install_error_handlers, outcome_of
from service.limits import BodyLimitMiddleware
from service.metrics import Metrics
from service.routes import COMPLETIONS_PATH, router
from service.settings import Settings

DEMO_PACKAGE = "clients"
DEMO_FOLDER = "web"


def create_app(
    settings: Settings,
    on_ready: Callable[[str], None] | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """Builds the app. Nothing starts until the app's lifespan begins: then the engine process is spawned, and
    /health answers 503 until the model is loaded. `on_ready(model)` runs each time the engine becomes ready,
    `on_fatal(message)` when the model cannot be loaded at all."""
    metrics = Metrics()
    bridge = EngineBridge(settings, metrics, on_ready=on_ready, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await bridge.start()
        try:
            yield
        finally:
            await bridge.stop()

    app = FastAPI(
        title="hogwild",
        summary="Hogwild! Inference: several workers of one LLM over one shared KV cache, streamed live",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.bridge = bridge
    app.state.started_at = int(time.time())

    def count_error(path: str, error: APIError) -> None:
        if path == COMPLETIONS_PATH:
            metrics.count_request(outcome_of(error))

    install_error_handlers(app, count_error, settings.retry_after_seconds)
    app.add_middleware(BodyLimitMiddleware, on_reject=count_error)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value(), on_reject=count_error)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.include_router(router)
    _document_the_api(app, needs_key=settings.api_key is not None)
    _serve_demo(app)
    return app


def _document_the_api(app: FastAPI, needs_key: bool) -> None:
    """Adjusts the generated OpenAPI document to what the service does: FastAPI documents a 422 on every route with
    a body, where this service answers 400 (see errors.py); and with an API key, the /v1 operations declare the
    bearer scheme, so /docs can send the key ("Authorize")."""
    build_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build_schema()
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
                    if needs_key and path.startswith(PROTECTED_PREFIX):
                        operation["security"] = [{"bearer": []}]
            if needs_key:
                schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "HOGWILD_API_KEY"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def demo_directory() -> Path | None:
    """clients/web next to the installed `clients` package, if it holds an index.html."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(location) / DEMO_FOLDER
        if (folder / "index.html").is_file():
            return folder
    return None


def _serve_demo(app: FastAPI) -> None:
    """Serves the browser demo: index.html at "/" and each file of its folder at "/<name>". One route per file
    rather than a catch-all mount, so a path the API knows answered with the wrong method still gets 405."""
    folder = demo_directory()
    if folder is not None:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                app.add_api_route(f"/{path.name}", _file_endpoint(path), methods=["GET", "HEAD"],
                                  include_in_schema=False)
        app.add_api_route("/", _file_endpoint(folder / "index.html"), methods=["GET", "HEAD"], include_in_schema=False)
        return

    @app.get("/", include_in_schema=False)
    async def demo_missing() -> None:
        raise APIError(404, "the browser demo is not installed: clients/web/index.html was not found", "demo_missing")


def _file_endpoint(path: Path) -> Callable[[], Awaitable[FileResponse]]:
    async def serve_file() -> FileResponse:
        return FileResponse(path)

    return serve_file
