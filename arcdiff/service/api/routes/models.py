"""GET /v1/models: what this deployment serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from arcdiff.contract import SOLVER_NAMES
from arcdiff.service.api.deps import BackendDep, require_api_key
from arcdiff.service.backend import Rejected
from arcdiff.service.schemas import ErrorOut, ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get(
    "",
    response_model=list[ModelOut],
    summary="List the served models",
    responses={
        401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
        403: {"model": ErrorOut, "description": "the API key matches none configured"},
    },
)
async def list_models(backend: BackendDep) -> list[ModelOut]:
    """Each model's image shape, prediction type, parameter count, the solvers it takes and its live workers."""
    try:
        workers: dict[str, int] = await backend.workers()
    except Rejected:  # Redis unreachable: the list is still known, the workers are not
        workers = {}
    return [
        ModelOut(
            name=info.name,
            image_size=info.image_size,
            channels=info.channels,
            prediction=info.prediction,
            parameters=info.parameters,
            solvers=list(SOLVER_NAMES),
            workers=workers.get(info.name),
            defaults=dict(zip(("solver", "steps", "schedule"), info.resolve(None, None, None), strict=True)),
            default_schedules={s: info.resolve(s, None, None)[2] for s in SOLVER_NAMES},
            distilled=info.distilled.to_dict() if info.distilled is not None else None,
        )
        for info in backend.models.values()
    ]
