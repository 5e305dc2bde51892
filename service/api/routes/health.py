"""GET /healthz (process alive), /readyz (able to serve), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.deps import BackendDep
from service.metrics import render
from service.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness")
async def healthz() -> HealthOut:
    return HealthOut()


@router.get("/readyz", response_model=ReadyOut, summary="Readiness",
            responses={503: {"model": ReadyOut, "description": "not ready; reason says why"}})
async def readyz(backend: BackendDep) -> JSONResponse:
    """Ready when the models are loaded (embedded) or Redis answers and a worker serves each model."""
    ready, reason = await backend.readiness()
    body = ReadyOut(status="ready" if ready else "not ready", mode=backend.mode, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(backend: BackendDep) -> Response:
    await backend.scrape()
    data, content_type = render()
    return Response(data, media_type=content_type)
