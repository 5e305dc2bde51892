"""GET /v1/models: what this deployment serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from arcdiff.contract import SOLVER_NAMES
from arcdiff.service.api.deps import BackendDep, require_api_key
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
    """Each model's image shape, prediction type, parameter count and the solvers it takes."""
    return [
        ModelOut(
            name=info.name,
            image_size=info.image_size,
            channels=info.channels,
            prediction=info.prediction,
            parameters=info.parameters,
            solvers=list(SOLVER_NAMES),
        )
        for info in backend.models.values()
    ]
