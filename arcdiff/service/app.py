"""The FastAPI app: settings -> served models -> backend (embedded engine or Redis queue) -> routes."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from arcdiff.model.catalog import ModelCatalog, ModelInfo
from arcdiff.service.api.deps import key_digests
from arcdiff.service.api.routes import edits, generations, health, models, playground, redoc
from arcdiff.service.backend import Backend, Limiter
from arcdiff.service.limits import BodyLimitMiddleware
from arcdiff.service.metrics import REJECTED, MetricsMiddleware, init_generation_series, init_route_series
from arcdiff.service.schemas import generation_request
from arcdiff.service.settings import ApiSettings, Settings
from arcdiff.service.webhooks import WebhookDispatcher

log = logging.getLogger("arcdiff.api")

DESCRIPTION = """Generate images with dual-head (x0 + eps) diffusion models.

POST a generation (model, steps, solver, seed, n); poll its url or send `"wait": true`. Each image
has its own seed, (seed + k) mod 2^32, so an image never depends on what else was in its batch.
"""


DOCS_STATIC = "/docs-static"  # Swagger UI and ReDoc's own files


class SetupError(RuntimeError):
    """The app cannot start as configured (e.g. ARCDIFF_MODELS names an unknown model)."""


def served_models(settings: ApiSettings) -> dict[str, ModelInfo]:
    registry = ModelCatalog(settings.model_dir)  # torch-free: config.json and the weights' header
    names = settings.models or registry.names()
    unknown = [n for n in names if n not in registry.models]
    if unknown:
        raise SetupError(
            f"unknown model(s) {', '.join(unknown)} in {registry.root}; known: {', '.join(registry.names()) or 'none'}"
        )
    for name, err in registry.errors.items():
        log.warning("model folder %s skipped: %s", name, err)
    return {n: registry.info(n) for n in names}


def make_backend(settings: ApiSettings, models: dict[str, ModelInfo]) -> Backend:
    """Redis mode: the queue client (no torch is imported). Embedded mode: the engine in this
    process, configured by the engine's settings (given with the API's, or from the environment)."""
    if settings.embedded:
        from arcdiff.service.embedded import EmbeddedBackend

        composed = settings if isinstance(settings, Settings) else Settings(**settings.model_dump())
        return EmbeddedBackend(composed, models)
    from arcdiff.service.queue import RedisBackend

    return RedisBackend(settings, models)


def _json_error(e: dict, body: object) -> str:
    """'body: invalid JSON: <what> at line L, column C' from FastAPI's json_invalid error."""
    what = (e.get("ctx") or {}).get("error") or "cannot be decoded"
    pos = e.get("loc", (None, None))[-1]
    if not isinstance(pos, int) or not isinstance(body, str):
        return f"body: invalid JSON: {what}"
    line = body.count("\n", 0, pos) + 1
    column = pos - (body.rfind("\n", 0, pos) + 1) + 1
    return f"body: invalid JSON: {what} at line {line}, column {column} (character offset {pos})"


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's detail list plus one message that names every bad field."""
    errors = exc.errors()
    message = "; ".join(
        _json_error(e, exc.body)
        if e.get("type") == "json_invalid"
        else f"{_field(e.get('loc', ()))}: {e.get('msg', 'invalid')}"
        for e in errors
    )
    if request.method == "POST" and request.url.path.rstrip("/") == generations.PREFIX:
        REJECTED.labels("invalid").inc()
    return JSONResponse({"message": message, "detail": _json_safe(jsonable_encoder(errors))}, status_code=422)


def _body_problem(cause: BaseException | None) -> str | None:
    """What made a request body unreadable, for FastAPI's bare 'There was an error parsing the body'."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8: {cause.reason} at byte offset {cause.start}"
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply to parse"
    if cause is not None:
        return f"the body cannot be parsed: {type(cause).__name__}: {cause}"
    return None


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Every HTTP error answers {"message": ..., "detail": ...} (detail as FastAPI has it)."""
    detail, path = exc.detail, request.url.path[:200]
    if exc.status_code == 400 and detail == "There was an error parsing the body":
        detail = _body_problem(exc.__cause__) or detail
    elif exc.status_code == 404 and detail == "Not Found":  # Starlette's words for an unknown route
        detail = f"no route {path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed on {path}" + (f" (allowed: {allowed})" if allowed else "")
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"message": str(detail), "detail": detail}, status_code=exc.status_code, headers=exc.headers)


def _json_safe(value: object) -> object:
    """Echoed inputs as strict JSON: a non-finite number (1e999 parses as inf) becomes its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def make_limiter(settings: ApiSettings, backend: Backend) -> Limiter | None:
    """The per-caller images-per-minute limiter, where the backend keeps it (None: no limit)."""
    if not settings.rate_limit_images_per_min:
        return None
    return backend.rate_limiter(settings.rate_limit_images_per_min)


def make_webhooks(settings: ApiSettings, backend: Backend) -> WebhookDispatcher | None:
    """The webhook deliverer of this process (None without ARCDIFF_WEBHOOK_SECRET: webhooks off).
    Its state lives where the backend keeps state, as long as a failed generation is kept."""
    if settings.webhook_secret is None:
        return None
    ttl = max(settings.result_ttl_s, settings.failure_ttl_s)
    return WebhookDispatcher(settings, backend.webhook_store(ttl), backend.get, generations.webhook_data)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or Settings()
    served = served_models(settings)
    backend = make_backend(settings, served)
    webhooks = make_webhooks(settings, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("arcdiff API (%s mode) serving %s", backend.mode, ", ".join(served) or "no models")
        await backend.start()
        if webhooks is not None:
            await webhooks.start()
        try:
            yield
        finally:
            if webhooks is not None:
                await webhooks.close()
            await backend.close()

    # /docs (Swagger UI) and /redoc load their scripts from this server (the files ship in the
    # fastapi-offline package), never from a CDN; validatorUrl null: no badge fetched from swagger.io
    app = FastAPIOffline(
        title="arcdiff",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_STATIC,
        redoc_url=None,  # our own /redoc (routes/redoc.py) keeps the page on this server
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.backend = backend
    app.state.key_digests = key_digests(settings.api_keys)
    app.state.limiter = make_limiter(settings, backend)
    app.state.idempotency = backend.idempotency_store(settings.idempotency_ttl_s)
    app.state.webhooks = webhooks
    # outermost last: metrics see every answer, the body guard's 413/415 included
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "Accept", "Last-Event-ID", "Idempotency-Key"],
            expose_headers=[
                "Location",
                "Retry-After",
                "Server-Timing",
                "X-Generation-Id",
                "X-Seed",
                "Idempotent-Replayed",
            ],
        )
    app.add_middleware(MetricsMiddleware)
    # the decorator form: add_exception_handler's type wants handlers of any Exception
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.include_router(generations.build_router(generation_request(list(served), settings.max_images)))
    app.include_router(edits.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    app.include_router(redoc.build_router(DOCS_STATIC))
    init_route_series(app)
    init_generation_series(served)
    return app
