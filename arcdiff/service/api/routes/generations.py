"""/v1/generations: create one (optionally waiting for it), read it, follow its events, cancel it,
fetch its PNGs."""

import base64
import functools
import inspect
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response, status
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from arcdiff.contract import (
    CLIENT_MAX,
    SEED_MAX,
    GenerationSpec,
    JobMetrics,
    SpecError,
    check_kind,
    decode_inputs,
    spec_nfe,
)
from arcdiff.model.catalog import ModelInfo
from arcdiff.service.api.deps import BackendDep, SettingsDep, require_api_key
from arcdiff.service.backend import Backend, Generation, Rejected
from arcdiff.service.metrics import GENERATIONS, REJECTED
from arcdiff.service.ratelimit import RateLimited
from arcdiff.service.schemas import (
    ConflictOut,
    ErrorOut,
    GenerationOut,
    GenerationRequest,
    ImageOut,
    LatencyOut,
    ValidationErrorOut,
)

# the `responses` of a route: status code -> its OpenAPI description (and model)
Responses = dict[int | str, dict[str, Any]]
ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
PREFIX = "/v1/generations"


def generation_url(gen_id: str) -> str:
    return f"{PREFIX}/{gen_id}"


# the spec's fields a request carries straight through, and those an answer echoes
SPEC_FIELDS = frozenset(GenerationSpec.__dataclass_fields__)
ECHOED = frozenset(GenerationOut.model_fields) & SPEC_FIELDS
# the spec's fields the route fills in (the defaults resolved, a seed drawn) rather than copies
FILLED = frozenset({"steps", "solver", "schedule", "seed"})


def to_out(gen: Generation) -> GenerationOut:
    spec, url = gen.spec, generation_url(gen.spec.id)
    out = GenerationOut(
        status=gen.status,
        url=url,
        nfe=spec_nfe(spec),
        error=gen.error,
        **{k: v for k, v in asdict(spec).items() if k in ECHOED},  # id, model, steps, solver, schedule, ...
    )
    if gen.result is not None:
        out.images = [
            ImageOut(
                index=im.index,
                seed=im.seed,
                png_base64=base64.b64encode(im.png).decode("ascii"),
                url=f"{url}/images/{im.index}.png",
            )
            for im in gen.result.images
        ]
        out.metrics = LatencyOut(**asdict(gen.result.metrics))
        out.latents = list(gen.result.latents) or None
    return out


def server_timing(metrics: JobMetrics) -> str:
    """The latency record as a Server-Timing header (milliseconds)."""
    parts = [
        ("queue", metrics.queue_ms),
        ("sample", metrics.sample_ms),
        ("encode", metrics.encode_ms),
        ("total", metrics.total_ms),
    ]
    return ", ".join(f"{name};dur={value:.3f}" for name, value in parts)


def accept_weights(accept: str) -> tuple[float, float]:
    """(q of image/png, q of JSON) from an Accept header; no header means JSON."""
    if not accept.strip():
        return 0.0, 1.0
    png = json = 0.0
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in ("image/png", "image/*"):
            png = max(png, q)
        if media in ("application/json", "application/*", "*/*"):
            json = max(json, q)
    return png, json


def _json(gen: Generation, code: int, headers: dict | None = None, workers: int | None = None) -> JSONResponse:
    body = to_out(gen).model_dump(mode="json", exclude={"workers"})
    if workers is not None:  # only answers to a POST that is not done say how many workers wait for it
        body["workers"] = workers
    return JSONResponse(body, status_code=code, headers=headers)


async def _workers(backend: Backend, model: str) -> int | None:
    """Live workers of `model` for an answer that is not done; None if they cannot be counted now."""
    try:
        return (await backend.workers()).get(model)
    except Rejected:
        return None


def _error(code: int, detail: str, headers: dict | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"message": detail, "detail": detail, **extra}, status_code=code, headers=headers)


EDIT_FIELDS = ("image", "mask", "noise", "strength", "seed_to", "solver", "n", "steps")


def invalid(e: SpecError, prefix: str = "") -> JSONResponse:
    """422 for an input the schema could not judge (an image against the model, a combination of
    fields), shaped as the schema's own 422s: a message naming the field, and a detail list."""
    msg = str(e)
    first = msg.split(" ", 1)[0]
    field = prefix + (first if first in EDIT_FIELDS else "body")
    REJECTED.labels("invalid").inc()
    return JSONResponse(
        {
            "message": f"{field}: {msg}",
            "detail": [{"loc": ["body", *field.split(".")], "msg": msg, "type": "value_error"}],
        },
        status_code=422,
    )


def check_inputs(spec: GenerationSpec, info: ModelInfo) -> JSONResponse | None:
    """The kind's rules and the inputs against the model, before anything is queued (the worker
    checks again); a 422 naming the field, or None. Nothing is written anywhere."""
    try:
        check_kind(spec)
        decode_inputs(spec, (info.channels, info.image_size, info.image_size), info.name)
    except SpecError as e:
        return invalid(e)
    return None


async def enqueue(request: Request, backend: Backend, spec: GenerationSpec) -> JSONResponse | None:
    """Queue `spec` within the caller's rate limit; the error response (429, 503), or None."""
    limiter = request.app.state.limiter
    caller = getattr(request.state, "client_id", "anonymous")
    try:
        if limiter is not None:
            await limiter.take(caller, spec.n)
        try:
            await backend.submit(spec)
        except Rejected:
            if limiter is not None:
                await limiter.give_back(caller, spec.n)
            raise
    except Rejected as e:
        REJECTED.labels(e.reason).inc()
        return _error(e.status_code, str(e), headers={"Retry-After": str(e.retry_after)})
    except RateLimited as e:
        REJECTED.labels("rate_limited").inc()
        return _error(status.HTTP_429_TOO_MANY_REQUESTS, str(e), headers={"Retry-After": str(e.retry_after)})
    return None


_CREATE_RESPONSES: Responses = {
    200: {
        "description": "wait=true and done in time: the generation (status finished or failed); with "
        "'Accept: image/png' and n=1, the PNG itself with a Server-Timing header",
        "content": {"image/png": {}},
    },
    202: {"description": "accepted (or wait=true and not done within the server's wait timeout): poll its url"},
    401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
    403: {"model": ErrorOut, "description": "the API key matches none configured"},
    406: {"model": ErrorOut, "description": "only image/png accepted, but the request is not wait=true with n=1"},
    413: {"model": ErrorOut, "description": "the body is larger than the server's limit"},
    415: {"model": ErrorOut, "description": "the body is not JSON (Content-Type: application/json)"},
    422: {"model": ValidationErrorOut, "description": "an invalid field; the message names it"},
    429: {
        "model": ErrorOut,
        "description": "the model's queue is full, or the key's images-per-minute limit is "
        "reached; retry after Retry-After seconds",
    },
    500: {"model": GenerationOut, "description": "'Accept: image/png' and the generation failed (error says why)"},
    503: {
        "model": ErrorOut,
        "description": "not ready (models loading, Redis unreachable, or no worker for the model with "
        "ARCDIFF_READY_REQUIRES_WORKERS set)",
    },
}


async def create_generation(
    body: GenerationRequest, request: Request, backend: BackendDep, settings: SettingsDep
) -> Response:
    """Queue a generation; with wait=true hold the request until it is done (or the server's wait
    timeout passes, then 202). Image k has seed (seed + k) mod 2^32."""
    png_q, json_q = accept_weights(request.headers.get("accept", ""))
    want_png = png_q > 0 and png_q >= json_q
    if want_png and not (body.wait and body.n == 1):
        if json_q <= 0:
            return _error(
                status.HTTP_406_NOT_ACCEPTABLE,
                "image/png is returned only for wait=true with n=1; use GET "
                f"{PREFIX}/{{id}}/images/{{k}}.png, or accept application/json",
            )
        want_png = False
    seed = body.seed if body.seed is not None else secrets.randbelow(SEED_MAX + 1)
    # the measured defaults, or a distilled student's own (model.catalog.ModelInfo.resolve)
    solver, steps, schedule = backend.models[body.model].resolve(body.solver, body.steps, body.schedule)
    caller = getattr(request.state, "client_id", "anonymous")
    # editing (issue 22): an input image makes it an edit; absent fields travel as the spec's defaults
    edit: dict[str, Any] = {
        "kind": "edit" if body.image is not None else "generate",
        "image": body.image or "",
        "mask": body.mask or "",
        "noise": body.noise or "",
        "strength": 1.0 if body.strength is None else float(body.strength),
    }
    # every other request field the spec has travels as given (a new one needs no line here)
    given: dict[str, Any] = {
        k: v for k, v in body.model_dump().items() if k in SPEC_FIELDS and k not in FILLED and k not in edit
    }
    spec = GenerationSpec(
        id=uuid.uuid4().hex,
        submitted_at=time.time(),
        client=caller[:CLIENT_MAX],  # no secret: a short hash of the key, or the address (for the per-key cap)
        steps=steps,
        solver=solver,
        schedule=schedule,
        seed=seed,
        **edit,
        **given,
    )
    bad = check_inputs(spec, backend.models[body.model])
    if bad is not None:
        return bad
    refused = await enqueue(request, backend, spec)
    if refused is not None:
        return refused
    location = {"Location": generation_url(spec.id)}
    if not body.wait:
        GENERATIONS.labels(spec.model, spec.solver, "queued").inc()
        workers = await _workers(backend, spec.model)
        return _json(Generation(spec, "queued"), status.HTTP_202_ACCEPTED, location, workers)
    gen = await backend.wait(spec.id, settings.wait_timeout_s) or Generation(spec, "queued")
    GENERATIONS.labels(spec.model, spec.solver, gen.status if gen.done else "queued").inc()
    if not gen.done:
        return _json(gen, status.HTTP_202_ACCEPTED, location, await _workers(backend, spec.model))
    if want_png:
        result = gen.result if gen.status == "finished" else None
        if result is None:
            return _json(gen, status.HTTP_500_INTERNAL_SERVER_ERROR, location)
        headers = {
            **location,
            "Server-Timing": server_timing(result.metrics),
            "X-Generation-Id": spec.id,
            "X-Seed": str(result.images[0].seed),
        }
        return Response(result.images[0].png, media_type="image/png", headers=headers)
    return _json(gen, status.HTTP_200_OK, location)


_READ_RESPONSES: Responses = {
    401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
    403: {"model": ErrorOut, "description": "the API key matches none configured"},
    404: {"model": ErrorOut, "description": "unknown or expired id"},
    503: {"model": ErrorOut, "description": "the queue is unreachable"},
}


async def read_generation(gen_id: str, backend: BackendDep) -> Response:
    """Status (queued, running, finished, failed); when finished its images and latency record."""
    gen = await _find(backend, gen_id)
    return gen if isinstance(gen, Response) else _json(gen, status.HTTP_200_OK)


_IMAGE_RESPONSES: Responses = {
    200: {"content": {"image/png": {}}, "description": "the PNG"},
    401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
    403: {"model": ErrorOut, "description": "the API key matches none configured"},
    404: {"model": ErrorOut, "description": "unknown id, or no image k"},
    409: {"model": ErrorOut, "description": "the generation is not finished"},
}


async def read_image(gen_id: str, k: int, backend: BackendDep) -> Response:
    gen = await _find(backend, gen_id)
    if isinstance(gen, Response):
        return gen
    result = gen.result if gen.status == "finished" else None
    if result is None:
        return _error(status.HTTP_409_CONFLICT, f"generation {gen_id} is {gen.status}, not finished")
    if not 0 <= k < len(result.images):
        return _error(status.HTTP_404_NOT_FOUND, f"generation {gen_id} has images 0..{len(result.images) - 1}")
    im = result.images[k]
    return Response(im.png, media_type="image/png", headers={"X-Seed": str(im.seed)})


_CANCEL_RESPONSES: Responses = {
    200: {"description": "canceled (now or before): the generation, status canceled"},
    202: {"description": "cancel sent, not yet confirmed by the worker: the generation as it is"},
    401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
    403: {"model": ErrorOut, "description": "the API key matches none configured"},
    404: {"model": ErrorOut, "description": "unknown or expired id"},
    409: {"model": ConflictOut, "description": "already finished or failed: status says which"},
    503: {"model": ErrorOut, "description": "the queue is unreachable"},
}


async def cancel_generation(gen_id: str, backend: BackendDep) -> Response:
    """Cancel a generation: a queued one never runs, a running one's images leave the batch at the
    next network evaluation. Idempotent: canceling a canceled generation answers it again."""
    gen = await _find(backend, gen_id)
    if isinstance(gen, Response):
        return gen
    if gen.status in ("finished", "failed"):
        return _error(status.HTTP_409_CONFLICT, f"generation {gen_id} is already {gen.status}", status=gen.status)
    try:
        after = await backend.cancel(gen_id)
    except Rejected as e:
        return _error(e.status_code, str(e), headers={"Retry-After": str(e.retry_after)})
    if after is None:
        return _error(status.HTTP_404_NOT_FOUND, f"no generation {gen_id} (unknown or expired)")
    if after.status in ("finished", "failed"):  # it ended before the cancel reached it
        return _error(status.HTTP_409_CONFLICT, f"generation {gen_id} is already {after.status}", status=after.status)
    return _json(after, status.HTTP_200_OK if after.status == "canceled" else status.HTTP_202_ACCEPTED)


_EVENTS_RESPONSES: Responses = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "server-sent events: queued, progress {nfe_done, nfe_total, images_done}, preview "
        "{index, nfe_done, png_base64} (when asked for), then one of finished, failed, canceled whose data is "
        "the generation (as GET returns it); each event has an id to resume from with Last-Event-ID",
    },
    **_READ_RESPONSES,
}
PING_S = 15  # a comment line this often keeps proxies from closing a quiet stream


async def generation_events(
    gen_id: str,
    request: Request,
    backend: BackendDep,
    last_event_id: Annotated[str | None, Header(description="resume after this event id")] = None,
) -> Response:
    """Follow a generation as server-sent events, until it ends."""
    gen = await _find(backend, gen_id)
    if isinstance(gen, Response):
        return gen

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async for ev in backend.events(gen_id, last_event_id):
            if ev.terminal:
                final = await backend.get(gen_id)
                # the body GET answers (workers is only in a POST's answer)
                data = to_out(final).model_dump(mode="json", exclude={"workers"}) if final else {"id": gen_id}
                yield ServerSentEvent(data=json.dumps(data), event=final.status if final else ev.event, id=ev.id)
                return
            yield ServerSentEvent(data=json.dumps(ev.data), event=ev.event, id=ev.id)

    return EventSourceResponse(stream(), ping=PING_S, headers={"Cache-Control": "no-store"})


def build_router(request_model: type[GenerationRequest]) -> APIRouter:
    """The generations router for this deployment's request schema (its models and largest n):
    create_generation validates its body with `request_model`, which also shows in /openapi.json."""
    router = APIRouter(prefix=PREFIX, tags=["generations"], dependencies=[Depends(require_api_key)])
    router.add_api_route(
        "",
        with_body_model(create_generation, request_model),
        methods=["POST"],
        status_code=status.HTTP_202_ACCEPTED,
        response_model=GenerationOut,
        responses=_CREATE_RESPONSES,
        summary="Generate images",
    )
    router.add_api_route(
        "/{gen_id}",
        read_generation,
        methods=["GET"],
        response_model=GenerationOut,
        summary="Read a generation",
        responses=_READ_RESPONSES,
    )
    router.add_api_route(
        "/{gen_id}",
        cancel_generation,
        methods=["DELETE"],
        response_model=GenerationOut,
        summary="Cancel a generation",
        responses=_CANCEL_RESPONSES,
    )
    router.add_api_route(
        "/{gen_id}/events",
        generation_events,
        methods=["GET"],
        summary="Follow a generation (server-sent events)",
        responses=_EVENTS_RESPONSES,
        response_class=Response,
    )
    router.add_api_route(
        "/{gen_id}/images/{k}.png",
        read_image,
        methods=["GET"],
        summary="One image as PNG",
        responses=_IMAGE_RESPONSES,
        response_class=Response,
    )
    return router


def with_body_model(
    endpoint: Callable[..., Awaitable[Response]], model: type[GenerationRequest]
) -> Callable[..., Awaitable[Response]]:
    """`endpoint` with its `body` parameter annotated as `model`: FastAPI reads the signature to
    validate the body and to write the schema, and the schema is per deployment."""
    signature = inspect.signature(endpoint)
    params = [p.replace(annotation=model) if p.name == "body" else p for p in signature.parameters.values()]

    @functools.wraps(endpoint)
    async def bound(*args: Any, **kwargs: Any) -> Response:
        return await endpoint(*args, **kwargs)

    bound.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return bound


async def _find(backend: Backend, gen_id: str) -> Generation | JSONResponse:
    """The generation, or the error response (404 unknown, 503 queue unreachable)."""
    if not ID_PATTERN.match(gen_id):
        return _error(status.HTTP_404_NOT_FOUND, f"no generation {gen_id[:64]!r}: ids are 32 lowercase hex digits")
    try:
        gen = await backend.get(gen_id)
    except Rejected as e:
        return _error(e.status_code, str(e), headers={"Retry-After": str(e.retry_after)})
    if gen is None:
        return _error(status.HTTP_404_NOT_FOUND, f"no generation {gen_id} (unknown or expired)")
    return gen
