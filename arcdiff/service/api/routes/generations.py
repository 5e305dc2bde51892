"""/v1/generations: create one (optionally waiting for it), read it, follow its events, cancel it,
fetch its PNGs."""

import base64
import functools
import inspect
import json
import logging
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
from arcdiff.service.api.deps import BackendDep, SettingsDep, idempotency_scope, owns, require_api_key
from arcdiff.service.backend import Backend, Generation, Rejected
from arcdiff.service.idempotency import KEY_PATTERN, MAX_KEY_LENGTH, Claim, Expired, InProgress, fingerprint, settle
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
    WebhookIn,
)
from arcdiff.service.webhook_targets import TargetRefused, Unresolvable
from arcdiff.service.webhooks import WebhookDispatcher

log = logging.getLogger("arcdiff.api")

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


def webhook_data(gen: Generation) -> dict[str, Any]:
    """A generation as a webhook delivery's `data`: the GET body without the PNGs (fetch them from
    each image's url) and without the webhook object."""
    data = to_out(gen).model_dump(mode="json", exclude={"workers", "webhook"})
    for im in data["images"]:
        im.pop("png_base64", None)
    return data


def _dispatcher(request: Request) -> WebhookDispatcher | None:
    return request.app.state.webhooks


async def _body(request: Request, gen: Generation) -> dict[str, Any]:
    """The generation's JSON body as GET answers it, its webhook's deliveries included."""
    body = to_out(gen).model_dump(mode="json", exclude={"workers"})
    webhooks = _dispatcher(request)
    if webhooks is not None:
        body["webhook"] = await webhooks.describe(gen.spec.id)
    return body


async def _json(
    request: Request, gen: Generation, code: int, headers: dict | None = None, workers: int | None = None
) -> JSONResponse:
    try:
        body = await _body(request, gen)
    except Rejected as e:
        return _rejected(e)
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


def _rejected(e: Rejected) -> JSONResponse:
    """The backend said not now (not ready, queue full): its status, and when to try again."""
    return _error(e.status_code, str(e), headers={"Retry-After": str(e.retry_after)})


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
    """Queue `spec` (an encoding's, an interpolation's) as create_generation does: within the
    caller's rate limit; the error response (429, 503), or None."""
    return await _submit(request, backend, spec, getattr(request.state, "client_id", "anonymous"))


def _invalid(loc: tuple[str, ...], kind: str, msg: str, value: Any = None) -> JSONResponse:
    """A 422 shaped as FastAPI's own: `message` naming the field, `detail` a list of one error."""
    REJECTED.labels("invalid").inc()
    field = ".".join(p for p in loc if p not in ("body", "header"))
    detail = [{"type": kind, "loc": list(loc), "msg": msg, "input": value}]
    return JSONResponse({"message": f"{field}: {msg}", "detail": detail}, status_code=422)


async def _check_webhook(request: Request, hook: WebhookIn) -> Response | None:
    """422 for a webhook this server cannot send: none configured, or a host it may not reach."""
    webhooks = _dispatcher(request)
    if webhooks is None:
        return _invalid(
            ("body", "webhook"),
            "webhooks_off",
            "this server sends no webhooks (the operator has set no ARCDIFF_WEBHOOK_SECRET)",
        )
    try:
        await webhooks.check_target(hook.url)
    except TargetRefused as e:
        return _invalid(("body", "webhook", "url"), "webhook_refused", f"refused: {e}", hook.url)
    except Unresolvable as e:
        return _invalid(("body", "webhook", "url"), "webhook_unresolvable", str(e), hook.url)
    return None


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        pattern=KEY_PATTERN,
        description="make the generation at most once: a repeat with the same key and body (within the server's "
        "idempotency TTL, per API key) answers the generation already made (Idempotent-Replayed: true); the same "
        "key with another body is 422",
    ),
]


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
    409: {
        "model": ErrorOut,
        "description": "Idempotency-Key: the first request with this key is still being submitted (retry), or "
        "the generation made with it has expired",
    },
    413: {"model": ErrorOut, "description": "the body is larger than the server's limit"},
    415: {"model": ErrorOut, "description": "the body is not JSON (Content-Type: application/json)"},
    422: {
        "model": ValidationErrorOut,
        "description": "an invalid field (the message names it), a webhook this server may not send, or an "
        "Idempotency-Key already used with another body",
    },
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
    body: GenerationRequest,
    request: Request,
    backend: BackendDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
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
    if body.webhook is not None and (refused := await _check_webhook(request, body.webhook)) is not None:
        return refused
    gen_id = uuid.uuid4().hex
    claim: tuple[str, str, Claim] | None = None
    if idempotency_key is not None:
        scope, mine = idempotency_scope(request), Claim(fingerprint(body.model_dump(mode="json")), gen_id)
        held = await _claim_key(request, backend, scope, idempotency_key, mine)
        if isinstance(held, Response):
            return held
        if held is not None:  # made before, with the same body: answer that generation
            return await _replay(request, backend, settings, held.gen_id, body.wait, want_png)
        claim = (scope, idempotency_key, mine)
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
        id=gen_id,
        submitted_at=time.time(),
        # no secret: a short hash of the key, or the address; the per-key cap, and with keys the owner
        client=caller[:CLIENT_MAX],
        steps=steps,
        solver=solver,
        schedule=schedule,
        seed=seed,
        **edit,
        **given,
    )
    refused = check_inputs(spec, backend.models[body.model]) or await _submit(request, backend, spec, caller)
    idem = request.app.state.idempotency
    if claim is not None:  # a refused request frees its key; an accepted one keeps it for the TTL
        await (idem.release(*claim) if refused is not None else idem.made(*claim))
    if refused is not None:
        return refused
    webhooks = _dispatcher(request)
    if body.webhook is not None and webhooks is not None:
        try:
            await webhooks.register(Generation(spec, "queued"), body.webhook.url, body.webhook.events)
        except Exception:  # the generation is accepted: answer it; the log says the webhook is lost
            log.exception("registering the webhook of %s failed", spec.id)
    return await _answer(request, backend, settings, spec, body.wait, want_png)


async def _submit(request: Request, backend: Backend, spec: GenerationSpec, caller: str) -> JSONResponse | None:
    """Count the images against the caller's limit and hand the generation to the backend; the
    error answer if either refuses (nothing counted then)."""
    limiter = request.app.state.limiter
    try:
        if limiter is not None:
            await limiter.take(caller, spec.n)
        try:
            await backend.submit(spec)
        except Rejected:
            if limiter is not None:
                await limiter.give_back(caller, spec.n)
            raise
    except RateLimited as e:
        REJECTED.labels("rate_limited").inc()
        return _error(status.HTTP_429_TOO_MANY_REQUESTS, str(e), headers={"Retry-After": str(e.retry_after)})
    except Rejected as e:
        REJECTED.labels(e.reason).inc()
        return _rejected(e)
    return None


async def _claim_key(request: Request, backend: Backend, scope: str, key: str, mine: Claim) -> Claim | Response | None:
    """Claim an Idempotency-Key: None (this request makes the generation), the claim of the
    generation made with it, or the error answer."""

    async def exists(gen_id: str) -> bool:
        return await backend.get(gen_id) is not None

    try:
        held = await settle(request.app.state.idempotency, scope, key, mine, exists)
    except InProgress:
        return _error(
            status.HTTP_409_CONFLICT,
            "a request with this Idempotency-Key is still being submitted; retry in a moment",
            headers={"Retry-After": "1"},
        )
    except Expired as e:
        return _error(
            status.HTTP_409_CONFLICT,
            f"the generation made with this Idempotency-Key ({e}) has expired; use a new key",
        )
    except Rejected as e:
        return _rejected(e)
    if held is not None and held.fingerprint != mine.fingerprint:
        return _invalid(
            ("header", "Idempotency-Key"),
            "idempotency_key_reused",
            "this key was already used with a different request body; use a new key for a new request",
            key,
        )
    return held


async def _replay(
    request: Request, backend: Backend, settings: SettingsDep, gen_id: str, wait: bool, want_png: bool
) -> Response:
    """The answer to a repeat of an idempotent request: the generation made by the first."""
    try:
        gen = await backend.get(gen_id)
    except Rejected as e:
        return _rejected(e)
    if gen is None:
        return _error(status.HTTP_409_CONFLICT, f"the generation made with this Idempotency-Key ({gen_id}) has expired")
    return await _answer(request, backend, settings, gen.spec, wait, want_png, replayed=gen)


async def _answer(
    request: Request,
    backend: Backend,
    settings: SettingsDep,
    spec: GenerationSpec,
    wait: bool,
    want_png: bool,
    replayed: Generation | None = None,
) -> Response:
    """The answer to a POST: 202 queued, or with wait=true the generation once done (200; as a
    PNG when asked for) or as it is after the wait timeout (202). A replayed generation answers as
    it is now (200 once done) and says so in Idempotent-Replayed."""
    headers = {"Location": generation_url(spec.id)}
    if replayed is not None:
        headers["Idempotent-Replayed"] = "true"
    if not wait:
        if replayed is None:
            GENERATIONS.labels(spec.model, spec.solver, "queued").inc()
        gen = replayed or Generation(spec, "queued")
        if gen.done:
            return await _json(request, gen, status.HTTP_200_OK, headers)
        return await _json(request, gen, status.HTTP_202_ACCEPTED, headers, await _workers(backend, spec.model))
    gen = await backend.wait(spec.id, settings.wait_timeout_s) or replayed or Generation(spec, "queued")
    if replayed is None:
        GENERATIONS.labels(spec.model, spec.solver, gen.status if gen.done else "queued").inc()
    if not gen.done:
        return await _json(request, gen, status.HTTP_202_ACCEPTED, headers, await _workers(backend, spec.model))
    if want_png:
        result = gen.result if gen.status == "finished" else None
        if result is None:
            return await _json(request, gen, status.HTTP_500_INTERNAL_SERVER_ERROR, headers)
        headers.update(
            {
                "Server-Timing": server_timing(result.metrics),
                "X-Generation-Id": spec.id,
                "X-Seed": str(result.images[0].seed),
            }
        )
        return Response(result.images[0].png, media_type="image/png", headers=headers)
    return await _json(request, gen, status.HTTP_200_OK, headers)


_READ_RESPONSES: Responses = {
    401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
    403: {"model": ErrorOut, "description": "the API key matches none configured"},
    404: {"model": ErrorOut, "description": "unknown or expired id"},
    503: {"model": ErrorOut, "description": "the queue is unreachable"},
}


async def read_generation(gen_id: str, request: Request, backend: BackendDep) -> Response:
    """Status (queued, running, finished, failed); when finished its images and latency record."""
    gen = await _find(request, backend, gen_id)
    return gen if isinstance(gen, Response) else await _json(request, gen, status.HTTP_200_OK)


_IMAGE_RESPONSES: Responses = {
    200: {"content": {"image/png": {}}, "description": "the PNG"},
    401: {"model": ErrorOut, "description": "API keys are configured and the request has none"},
    403: {"model": ErrorOut, "description": "the API key matches none configured"},
    404: {"model": ErrorOut, "description": "unknown id, or no image k"},
    409: {"model": ErrorOut, "description": "the generation is not finished"},
}


async def read_image(gen_id: str, k: int, request: Request, backend: BackendDep) -> Response:
    gen = await _find(request, backend, gen_id)
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


async def cancel_generation(gen_id: str, request: Request, backend: BackendDep) -> Response:
    """Cancel a generation: a queued one never runs, a running one's images leave the batch at the
    next network evaluation. Idempotent: canceling a canceled generation answers it again."""
    gen = await _find(request, backend, gen_id)
    if isinstance(gen, Response):
        return gen
    if gen.status in ("finished", "failed"):
        return _error(status.HTTP_409_CONFLICT, f"generation {gen_id} is already {gen.status}", status=gen.status)
    try:
        after = await backend.cancel(gen_id)
    except Rejected as e:
        return _rejected(e)
    if after is None:
        return _error(status.HTTP_404_NOT_FOUND, f"no generation {gen_id} (unknown or expired)")
    if after.status in ("finished", "failed"):  # it ended before the cancel reached it
        return _error(status.HTTP_409_CONFLICT, f"generation {gen_id} is already {after.status}", status=after.status)
    return await _json(request, after, status.HTTP_200_OK if after.status == "canceled" else status.HTTP_202_ACCEPTED)


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
    gen = await _find(request, backend, gen_id)
    if isinstance(gen, Response):
        return gen

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async for ev in backend.events(gen_id, last_event_id):
            if ev.terminal:
                final = await backend.get(gen_id)
                # the body GET answers (workers is only in a POST's answer)
                try:
                    data = await _body(request, final) if final else {"id": gen_id}
                except Rejected:  # the webhook's state is unreadable now: the generation without it
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


async def _find(request: Request, backend: Backend, gen_id: str) -> Generation | JSONResponse:
    """The generation, or the error response (404 unknown, or another API key's; 503 queue unreachable)."""
    if not ID_PATTERN.match(gen_id):
        return _error(status.HTTP_404_NOT_FOUND, f"no generation {gen_id[:64]!r}: ids are 32 lowercase hex digits")
    try:
        gen = await backend.get(gen_id)
    except Rejected as e:
        return _rejected(e)
    if gen is None or not owns(request, gen.spec):  # another key's answers as an unknown id does
        return _error(status.HTTP_404_NOT_FOUND, f"no generation {gen_id} (unknown or expired)")
    return gen
