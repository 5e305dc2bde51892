"""GET /healthz (process alive), /readyz (able to serve), /metrics (Prometheus; needs a key when keys are set)."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from arcdiff.service.api.deps import BackendDep, require_api_key
from arcdiff.service.backend import Rejected
from arcdiff.service.metrics import render
from arcdiff.service.schemas import ErrorOut, HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness")
async def healthz() -> HealthOut:
    return HealthOut()


@router.get(
    "/readyz",
    response_model=ReadyOut,
    summary="Readiness",
    responses={503: {"model": ReadyOut, "description": "not ready; reason says why"}},
)
async def readyz(backend: BackendDep) -> JSONResponse:
    """Ready when the models are loaded (embedded) or Redis answers (with Redis, generations wait in
    the queue for a worker; ARCDIFF_READY_REQUIRES_WORKERS also wants a live worker per model)."""
    ready, reason = await backend.readiness()
    body = ReadyOut(status="ready" if ready else "not ready", mode=backend.mode, reason=reason)
    if ready:
        with contextlib.suppress(Rejected):
            body.workers = await backend.workers()
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[Depends(require_api_key)],
    responses={
        200: {"content": {"text/plain": {}}},
        401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
        403: {"model": ErrorOut, "description": "the API key matches none configured"},
    },
)
async def metrics(backend: BackendDep) -> Response:
    await backend.scrape()
    data, content_type = render()
    return Response(data, media_type=content_type)
