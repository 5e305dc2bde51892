"""/v1/encodings and /v1/interpolations (issue 22): the image's noise latent, and frames between two
ends. Both are generations underneath (kind encode and interpolate): they run in the same batch,
and GET /v1/generations/{id} (events, cancel, images) works on their ids."""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import JSONResponse
from PIL import Image

from arcdiff.contract import CLIENT_MAX, SEED_MAX, GenerationSpec, SpecError, decode_png, spec_nfe
from arcdiff.model.catalog import ModelInfo
from arcdiff.model.solver_names import ENCODE_SOLVERS
from arcdiff.service.api.deps import BackendDep, SettingsDep, require_api_key
from arcdiff.service.api.routes.generations import (
    _CREATE_RESPONSES,
    Responses,
    _answer,
    _error,
    check_inputs,
    enqueue,
    generation_url,
    invalid,
)
from arcdiff.service.backend import Backend, Generation
from arcdiff.service.metrics import GENERATIONS
from arcdiff.service.schemas import (
    EncodingOut,
    EncodingRequest,
    ErrorOut,
    GenerationOut,
    InterpolationEnd,
    InterpolationRequest,
    LatencyOut,
    RoundTripOut,
    ValidationErrorOut,
)

router = APIRouter(prefix="/v1", tags=["editing"], dependencies=[Depends(require_api_key)])

_RESPONSES: Responses = {
    401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
    403: {"model": ErrorOut, "description": "the API key matches none configured"},
    413: {"model": ErrorOut, "description": "the body is larger than the server's limit"},
    422: {
        "model": ValidationErrorOut,
        "description": "an invalid field, or an image that does not fit the model (its size, mode or channels, not a "
        "PNG, too large): the message names it",
    },
    429: _CREATE_RESPONSES[429],
    503: _CREATE_RESPONSES[503],
}


def _model(backend: Backend, name: str) -> ModelInfo | JSONResponse:
    info = backend.models.get(name)
    if info is None:
        return invalid(SpecError(f"model {name!r} is not served here; served: {', '.join(backend.models) or 'none'}"))
    return info


def _spec(request: Request, model: str, **fields: Any) -> GenerationSpec:
    caller = getattr(request.state, "client_id", "anonymous")
    fields.setdefault("seed", secrets.randbelow(SEED_MAX + 1))
    return GenerationSpec(
        id=uuid.uuid4().hex, model=model, submitted_at=time.time(), client=caller[:CLIENT_MAX], **fields
    )


def _latent(gen: Generation) -> str | None:
    if gen.status != "finished" or gen.result is None or not gen.result.latents:
        return None
    return gen.result.latents[0]


def _encoding_out(gen: Generation, info: ModelInfo) -> EncodingOut:
    spec = gen.spec
    done = gen.status == "finished" and gen.result is not None
    return EncodingOut(
        id=spec.id,
        status=gen.status,
        url=generation_url(spec.id),
        model=spec.model,
        steps=spec.steps,
        solver=spec.solver,
        schedule=spec.schedule,
        nfe=spec_nfe(spec),
        shape=[info.channels, info.image_size, info.image_size],
        latent_base64=_latent(gen),
        png_base64=base64.b64encode(gen.result.images[0].png).decode("ascii") if done and gen.result else None,
        error=gen.error,
        metrics=LatencyOut(**gen.result.metrics.__dict__) if done and gen.result else None,
    )


def _pixels(png: bytes) -> np.ndarray:
    """A PNG the engine wrote -> float (C, H, W) grey levels."""
    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im, dtype=np.float64)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


async def create_encoding(
    body: EncodingRequest, request: Request, backend: BackendDep, settings: SettingsDep
) -> Response:
    """Encode an image: the ODE from eta = 0 up to pi/2 gives the noise latent that generates it
    (float32 little-endian, base64: send it as a generation's `noise`, or an interpolation end).
    With roundtrip=true the latent is decoded again and the error reported."""
    info = _model(backend, body.model)
    if isinstance(info, JSONResponse):
        return info
    spec = _spec(
        request,
        body.model,
        steps=body.steps,
        solver=body.solver,
        schedule=body.schedule,
        n=1,
        priority=body.priority,
        kind="encode",
        image=body.image,
    )
    refused = check_inputs(spec, info) or await enqueue(request, backend, spec)
    if refused is not None:
        return refused
    GENERATIONS.labels(spec.model, spec.solver, "queued").inc()
    if not body.wait:
        return JSONResponse(_encoding_out(Generation(spec, "queued"), info).model_dump(mode="json"), status_code=202)
    deadline = time.monotonic() + settings.wait_timeout_s
    gen = await backend.wait(spec.id, settings.wait_timeout_s) or Generation(spec, "queued")
    out = _encoding_out(gen, info)
    latent = _latent(gen)
    if latent is not None and body.roundtrip:
        dec = _spec(
            request, body.model, steps=body.steps, solver=body.solver, schedule=body.schedule, n=1,
            priority=body.priority, noise=latent,
        )  # fmt: skip
        if await enqueue(request, backend, dec) is None:
            back = await backend.wait(dec.id, max(0.1, deadline - time.monotonic()))
            if back is not None and back.status == "finished" and back.result is not None:
                png = back.result.images[0].png
                shape = (info.channels, info.image_size, info.image_size)
                diff = _pixels(png) - decode_png(body.image, shape, "image").astype(np.float64)
                out.roundtrip = RoundTripOut(
                    rms_grey=round(float(np.sqrt(np.mean(diff**2))), 4),
                    max_grey=int(np.abs(diff).max()),
                    png_base64=base64.b64encode(png).decode("ascii"),
                    id=dec.id,
                )
    code = status.HTTP_200_OK if gen.done else status.HTTP_202_ACCEPTED
    return JSONResponse(out.model_dump(mode="json"), status_code=code, headers={"Location": out.url})


def _end_kind(end: InterpolationEnd, which: str) -> str:
    given = [k for k in ("seed", "noise", "image") if getattr(end, k) is not None]
    if len(given) != 1:
        raise SpecError(f"{which} needs exactly one of seed, noise, image; got {', '.join(given) or 'none'}")
    return given[0]


async def _encode_ends(
    request: Request, backend: Backend, settings: SettingsDep, info: ModelInfo, body: InterpolationRequest
) -> list[str] | JSONResponse:
    """The latents of the two end images: two encodings, in the batch like any other rows, waited
    for; or the error response."""
    if body.solver not in ENCODE_SOLVERS:
        return invalid(
            SpecError(f"solver {body.solver!r} cannot encode the images; use one of {', '.join(ENCODE_SOLVERS)}")
        )
    common = {"steps": body.steps, "solver": body.solver, "schedule": body.schedule, "priority": body.priority}
    encs = [_spec(request, body.model, n=1, kind="encode", image=e.image, **common) for e in (body.start, body.end)]
    for e in encs:
        refused = check_inputs(e, info) or await enqueue(request, backend, e)
        if refused is not None:
            return refused
    done = await asyncio.gather(*(backend.wait(e.id, settings.wait_timeout_s) for e in encs))
    latents = []
    for g, which in zip(done, ("start", "end"), strict=True):
        if g is None or not g.done:
            return _error(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"the encoding of the {which} image did not finish within {settings.wait_timeout_s:g} s",
                headers={"Retry-After": "5"},
            )
        latent = _latent(g)
        if latent is None:
            return _error(422, f"{which}.image: encoding failed: {g.error}")
        latents.append(latent)
    return latents


async def create_interpolation(
    body: InterpolationRequest, request: Request, backend: BackendDep, settings: SettingsDep
) -> Response:
    """`frames` images along the great circle (slerp) between two latents, decoded: the noise of two
    seeds, two given latents, or two images' encodings (encoded first, with the same solver, steps
    and grid). The answer is a generation of kind interpolate, image k at t = k / (frames - 1)."""
    info = _model(backend, body.model)
    if isinstance(info, JSONResponse):
        return info
    try:
        kind = _end_kind(body.start, "start")
        if _end_kind(body.end, "end") != kind:
            raise SpecError(f"both ends must be of one kind (two seeds, noises or images), got {kind} and another")
    except SpecError as e:
        return invalid(e)
    fields: dict[str, Any] = {
        "steps": body.steps, "solver": body.solver, "schedule": body.schedule, "priority": body.priority,
        "n": body.frames, "kind": "interpolate",
    }  # fmt: skip
    if kind == "seed":
        fields.update(seed=body.start.seed, seed_to=body.end.seed)
    else:
        latents = (
            [body.start.noise or "", body.end.noise or ""]
            if kind == "noise"
            else await _encode_ends(request, backend, settings, info, body)
        )
        if isinstance(latents, JSONResponse):
            return latents
        try:  # the two ends as one noise payload: n latents back to back
            fields["noise"] = base64.b64encode(b"".join(base64.b64decode(z, validate=True) for z in latents)).decode()
        except ValueError:
            return invalid(SpecError("noise is not valid base64"))
    spec = _spec(request, body.model, **fields)
    refused = check_inputs(spec, info) or await enqueue(request, backend, spec)
    if refused is not None:
        return refused
    return await _answer(request, backend, settings, spec, body.wait, want_png=False)


router.add_api_route(
    "/encodings",
    create_encoding,
    methods=["POST"],
    response_model=EncodingOut,
    responses={**_RESPONSES, 202: {"model": EncodingOut, "description": "not done in time: poll its url"}},
    summary="Encode an image to its noise latent",
)
router.add_api_route(
    "/interpolations",
    create_interpolation,
    methods=["POST"],
    response_model=GenerationOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**_RESPONSES, 200: {"model": GenerationOut, "description": "wait=true and done in time"}},
    summary="Frames between two seeds, noises or images",
)
