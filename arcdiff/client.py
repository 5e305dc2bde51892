"""A small Python client for the arcdiff HTTP API (sync `Client` and async `AsyncClient`).

    from arcdiff.client import Client

    with Client("http://localhost:8000", api_key=None) as client:
        result = client.generate("mnist", steps=10, solver="rk4", seed=7, n=4)
    for im in result.images:
        im.image.save(f"seed{im.seed}.png")          # PIL images, each with its own seed
    print(result.nfe, result.metrics["total_ms"])     # the latency record

`generate` submits a generation with `"wait": true` (the server answers when the images are done)
and polls it if the server answers 202 first, until it is finished, failed, or `timeout` seconds
have passed. 429 (queue full) and 503 (not ready) are retried after the server's `Retry-After`
(capped at `max_retry_wait` seconds, at most `max_retries` times, and never past the deadline);
any other error raises `APIError` carrying the API's own message (for 422, the one that names the
bad fields). Only httpx, httpx-sse and (when images are decoded) Pillow are imported: no torch.
`Client` and `AsyncClient` share one core: each operation is a generator of effects (requests,
sleeps, events) that the two classes only drive, blocking or awaited (see "the core" below).

Follow a generation as it runs (server-sent events; a dropped stream is resumed with Last-Event-ID):

    gen = client.submit("mnist", steps=1000, solver="rk4", n=4, preview=True)
    for ev in client.events(gen["id"]):     # async: `async for ev in aclient.events(...)`
        if ev.event == "progress":
            print(ev.data["nfe_done"], "/", ev.data["nfe_total"])
        elif ev.event == "preview":           # image ev.data["index"]'s current x0_hat, a PNG
            ...
    client.cancel(gen["id"])                  # a queued one never runs, a running one stops
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "APIError",
    "ArcdiffError",
    "AsyncClient",
    "Client",
    "Edit",
    "Encoding",
    "GeneratedImage",
    "GenerationCanceled",
    "GenerationEvent",
    "GenerationFailed",
    "GenerationResult",
    "GenerationTimeout",
    "Unreachable",
]

RETRY_STATUSES = (429, 503)
TERMINAL = ("finished", "failed", "canceled")
RESUMES = 5  # times a broken event stream is resumed (Last-Event-ID) before giving up


class ArcdiffError(Exception):
    """Base of the client's errors."""


class APIError(ArcdiffError):
    """The API answered with an error; `message` is the API's own text (422: every bad field)."""

    def __init__(self, status_code: int, message: str, body: Any = None, retry_after: float | None = None):
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.body = body
        self.retry_after = retry_after

    @property
    def fields(self) -> dict[str, str]:
        """For a 422: field name -> the API's message about it."""
        out: dict[str, str] = {}
        detail = self.body.get("detail") if isinstance(self.body, dict) else None
        if isinstance(detail, list):
            for e in detail:
                loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")]
                out.setdefault(".".join(loc) or "body", e.get("msg", "invalid"))
        return out


class Unreachable(ArcdiffError):
    """No answer from the server (connection refused, reset, timed out)."""

    def __init__(self, base_url: str, cause: Exception):
        super().__init__(f"cannot reach {base_url}: {type(cause).__name__}: {cause}")
        self.base_url = base_url


class GenerationFailed(ArcdiffError):
    """The generation was accepted but failed on the server; `error` says why."""

    def __init__(self, gen_id: str, error: str | None):
        super().__init__(f"generation {gen_id} failed: {error or 'unknown error'}")
        self.id = gen_id
        self.error = error


class GenerationTimeout(ArcdiffError, TimeoutError):
    """The generation was not done within the client's timeout; it may still finish (poll `id`)."""

    def __init__(self, gen_id: str | None, timeout: float, status: str | None = None):
        what = f"generation {gen_id} still {status}" if gen_id else "no answer to the generation request"
        super().__init__(f"{what} after {timeout:g} s")
        self.id = gen_id
        self.status = status


class GenerationCanceled(GenerationFailed):
    """The generation was canceled (DELETE) before it finished."""


@dataclass
class GenerationEvent:
    """One server-sent event of a generation: queued, progress, preview, or a terminal one
    (finished, failed, canceled) whose data is the generation's body, as GET returns it."""

    event: str
    data: dict
    id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL

    @property
    def png(self) -> bytes:
        """A preview's PNG."""
        return base64.b64decode(self.data["png_base64"])

    @classmethod
    def parse(cls, sse: ServerSentEvent) -> GenerationEvent:
        return cls(sse.event, json.loads(sse.data) if sse.data else {}, sse.id or None)


@dataclass
class GeneratedImage:
    index: int
    seed: int
    png: bytes = field(repr=False)

    @property
    def image(self) -> Image:
        """The PNG as a PIL image (decoded on first use)."""
        if not hasattr(self, "_image"):
            from PIL import Image as PILImage

            im = PILImage.open(io.BytesIO(self.png))
            im.load()
            self._image = im
        return self._image


@dataclass
class GenerationResult:
    id: str
    model: str
    steps: int
    solver: str
    seed: int
    n: int
    nfe: int
    images: list[GeneratedImage]
    metrics: dict[str, Any] = field(default_factory=dict)
    retries: int = 0  # 429/503 answers retried before the generation was accepted
    schedule: str = "uniform"  # the time grid the images were sampled on
    priority: str = "interactive"  # interactive or batch
    webhook: dict | None = None  # the request's webhook and its deliveries, as the server last said

    @property
    def pil_images(self) -> list[Image]:
        return [im.image for im in self.images]

    @property
    def seeds(self) -> list[int]:
        return [im.seed for im in self.images]

    @classmethod
    def from_body(cls, body: dict, retries: int = 0) -> GenerationResult:
        images = [
            GeneratedImage(im["index"], im["seed"], base64.b64decode(im["png_base64"]))
            for im in body.get("images") or []
        ]
        return cls(
            id=body["id"],
            model=body["model"],
            steps=body["steps"],
            solver=body["solver"],
            seed=body["seed"],
            n=body["n"],
            nfe=body["nfe"],
            images=images,
            metrics=body.get("metrics") or {},
            retries=retries,
            schedule=body.get("schedule", "uniform"),
            priority=body.get("priority", "interactive"),
            webhook=body.get("webhook"),
        )


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """Retry-After as seconds: delta-seconds or an HTTP date; `default` when absent or unreadable."""
    if not value:
        return default
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


def _error(r: httpx.Response) -> APIError:
    try:
        body: Any = r.json()
    except ValueError:
        body = r.text
    message = None
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail")
        if not isinstance(message, str):
            message = None
    if message is None:
        message = (body.strip()[:500] if isinstance(body, str) and body.strip() else r.reason_phrase) or "error"
    retry = retry_after_seconds(r.headers.get("retry-after"), default=0.0) if "retry-after" in r.headers else None
    return APIError(r.status_code, message, body, retry)


# ---- the core: every operation once, as a generator of effects (sans-IO) --------------------------
#
# An operation is a generator that yields what it needs done and receives the outcome: `_Send` (one
# request; answered with its httpx.Response), `_Open` (an event stream; answered with its response,
# the body read if it is an error), `_NEXT` (the stream's next ServerSentEvent, None once it ends),
# `_Sleep` and `_Emit` (hand an event to the caller). A transport error is thrown back in where it
# happened. `Client` and `AsyncClient` are only the drivers that do these things, blocking or awaited.


@dataclass(frozen=True)
class _Send:
    method: str
    path: str
    kw: dict[str, Any]


@dataclass(frozen=True)
class _Open:
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _Emit:
    event: GenerationEvent


class _Next:
    pass


_NEXT = _Next()
_Effect = _Send | _Open | _Next | _Sleep | _Emit
_T = TypeVar("_T")
_Flow = Generator[_Effect, Any, _T]


class _Runner:
    """Steps one operation: `step()` passes on the answer (or error) set since and returns the next
    effect, or None when the operation has returned (its value in `value`)."""

    def __init__(self, flow: _Flow[Any]):
        self.flow = flow
        self.answer: Any = None
        self.error: BaseException | None = None
        self.value: Any = None
        self.events: Any = None  # the open stream's event iterator (the driver's kind)

    def step(self) -> _Effect | None:
        answer, error, self.answer, self.error = self.answer, self.error, None, None
        try:
            return self.flow.throw(error) if error is not None else self.flow.send(answer)
        except StopIteration as stop:
            self.value = stop.value
            return None


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        max_retries: int = 8,
        max_retry_wait: float = 30.0,
        poll_interval: float = 0.1,
        max_poll_interval: float = 1.0,
        request_timeout: float = 30.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.request_timeout = request_timeout

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "arcdiff-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @staticmethod
    def _body(
        model: str,
        steps: int | None,
        solver: str | None,
        seed: int | None,
        n: int,
        wait: bool,
        schedule: str | None,
        preview: bool = False,
        priority: str | None = None,
        webhook: str | dict[str, Any] | None = None,
        edit: Edit | None = None,
    ) -> dict:
        """The POST body; steps, solver, schedule, priority and webhook left out when None (the
        server's defaults). `webhook`: a URL, or {"url": ..., "events": [...]}. `edit` adds an
        edit's fields (image-to-image, inpainting, given noise)."""
        body: dict[str, Any] = {"model": model, "n": n, **(edit.fields() if edit else {})}
        for key, value in (("steps", steps), ("solver", solver), ("schedule", schedule), ("priority", priority)):
            if value is not None:
                body[key] = value
        if seed is not None:
            body["seed"] = seed
        if wait:
            body["wait"] = True
        if preview:
            body["preview"] = True
        if webhook is not None:
            body["webhook"] = {"url": webhook} if isinstance(webhook, str) else dict(webhook)
        return body

    @staticmethod
    def _resume_headers(last_id: str | None) -> dict[str, str]:
        return {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}

    def _post_timeout(self, wait: bool, deadline: float) -> httpx.Timeout:
        """A wait=true POST is held by the server until done: read for as long as the deadline allows."""
        read = max(0.01, deadline - time.monotonic()) if wait else self.request_timeout
        return httpx.Timeout(self.request_timeout, read=read)

    def _retry_wait(self, r: httpx.Response, attempt: int, deadline: float) -> float | None:
        """Seconds to sleep before retrying `r`, or None to give up (not retryable, out of tries or time)."""
        if r.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        wait = min(retry_after_seconds(r.headers.get("retry-after")), self.max_retry_wait)
        if time.monotonic() + wait > deadline:
            return None
        return wait

    def _next_poll(self, interval: float) -> float:
        return min(self.max_poll_interval, interval * 1.5)

    @staticmethod
    def _result(body: dict, retries: int) -> GenerationResult:
        if body["status"] == "canceled":
            raise GenerationCanceled(body["id"], body.get("error"))
        if body["status"] == "failed":
            raise GenerationFailed(body["id"], body.get("error"))
        return GenerationResult.from_body(body, retries)

    # -- the operations --

    def _request(self, method: str, path: str, deadline: float, **kw: Any) -> _Flow[tuple[httpx.Response, int]]:
        """One API call; 429/503 retried after Retry-After (bounded); returns (response, retries)."""
        attempt = 0
        while True:
            try:
                r = yield _Send(method, path, kw)
            except httpx.TransportError as e:
                raise Unreachable(self.base_url, e) from e
            if r.status_code < 400:
                return r, attempt
            wait = self._retry_wait(r, attempt, deadline)
            if wait is None:
                raise _error(r)
            attempt += 1
            yield _Sleep(wait)

    def _json(self, method: str, path: str) -> _Flow[Any]:
        """A call that is retried for up to max_retry_wait seconds; returns its JSON body."""
        r, _ = yield from self._request(method, path, time.monotonic() + self.max_retry_wait)
        return r.json()

    def _submit(
        self, body: dict, timeout: float, idempotency_key: str | None = None, path: str = "/v1/generations"
    ) -> _Flow[dict]:
        """POST `body` (see `_body`) to `path`; with "wait" the read may last until the deadline. With
        an `idempotency_key` a repeat (a retry after 429/503 included) makes no second generation."""
        wait = bool(body.get("wait"))
        deadline = time.monotonic() + timeout
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        try:
            r, retries = yield from self._request(
                "POST",
                path,
                deadline,
                json=body,
                headers=headers,
                timeout=self._post_timeout(wait, deadline),
            )
        except Unreachable as e:
            if wait and isinstance(e.__cause__, httpx.ReadTimeout):
                raise GenerationTimeout(None, timeout, "waited on") from e
            raise
        return {**r.json(), "retries": retries}

    def _events(
        self, gen_id: str, handle: Callable[[GenerationEvent], None] | None = None
    ) -> _Flow[GenerationEvent | None]:
        """Each event emitted (or passed to `handle`); returns the terminal one, or None if the server
        closed the stream before it. A broken stream is resumed from the last event seen."""
        last_id, resumes = None, 0
        while True:
            try:
                r = yield _Open(f"/v1/generations/{gen_id}/events", self._resume_headers(last_id))
                if r.status_code >= 400:
                    raise _error(r)
                while (sse := (yield _NEXT)) is not None:
                    ev = GenerationEvent.parse(sse)
                    last_id = ev.id or last_id
                    if handle is None:
                        yield _Emit(ev)
                    else:
                        handle(ev)
                    if ev.terminal:
                        return ev
            except httpx.TransportError as e:
                resumes += 1
                if resumes > RESUMES:
                    raise Unreachable(self.base_url, e) from e
                yield _Sleep(min(2.0, 0.1 * 2**resumes))
                continue
            return None  # the server closed the stream before a terminal event: nothing more to follow

    def _generate(
        self,
        request: dict,
        timeout: float,
        on_event: Callable[[GenerationEvent], None] | None = None,
        idempotency_key: str | None = None,
        path: str = "/v1/generations",
    ) -> _Flow[GenerationResult]:
        """Submit `request` (to `path`: generations, or interpolations) and follow it to its end:
        through its events when `on_event` is given (submitted without "wait"), else by waiting and
        polling (without "preview")."""
        deadline = time.monotonic() + timeout
        if on_event is not None:
            body = yield from self._submit(
                {k: v for k, v in request.items() if k != "wait"}, timeout, idempotency_key, path
            )

            def handle(ev: GenerationEvent) -> None:
                if time.monotonic() > deadline:
                    raise GenerationTimeout(body["id"], timeout, "running")
                on_event(ev)

            end = yield from self._events(body["id"], handle)
            if end is not None:
                return self._result(end.data, body["retries"])
        body = yield from self._submit(
            {k: v for k, v in request.items() if k != "preview"}, timeout, idempotency_key, path
        )
        retries, interval = body["retries"], self.poll_interval
        while body["status"] not in TERMINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GenerationTimeout(body["id"], timeout, body["status"])
            yield _Sleep(min(interval, left))
            interval = self._next_poll(interval)
            body = (yield from self._request("GET", f"/v1/generations/{body['id']}", deadline))[0].json()
        return self._result(body, retries)

    @staticmethod
    def _interpolation(
        model: str, start: End, end: End, frames: int, steps: int | None, solver: str | None, schedule: str | None
    ) -> dict:
        """The POST /v1/interpolations body (wait=true)."""
        body: dict[str, Any] = {"model": model, "start": _end(start), "end": _end(end), "frames": frames, "wait": True}
        for key, value in (("steps", steps), ("solver", solver), ("schedule", schedule)):
            if value is not None:
                body[key] = value
        return body

    def _encode(
        self, model: str, image: bytes, steps: int | None, solver: str | None, roundtrip: bool, timeout: float
    ) -> _Flow[Encoding]:
        """POST /v1/encodings (wait=true); an answer not done in time is polled as a generation."""
        body: dict[str, Any] = {"model": model, "image": _b64(image), "roundtrip": roundtrip}
        for key, value in (("steps", steps), ("solver", solver)):
            if value is not None:
                body[key] = value
        deadline = time.monotonic() + timeout
        out = yield from self._submit({**body, "wait": True}, timeout, path="/v1/encodings")
        if out["status"] not in TERMINAL:  # polled as the generation it is: its latent is in "latents"
            gen = yield from self._generate_poll(out["id"], deadline, timeout, out["retries"])
            out = {**out, "status": gen["status"], "latent_base64": (gen.get("latents") or [None])[0]}
        if out["status"] != "finished":
            raise GenerationFailed(out["id"], out.get("error"))
        return Encoding.from_body(out)

    def _generate_poll(self, gen_id: str, deadline: float, timeout: float, retries: int) -> _Flow[dict]:
        interval, body = self.poll_interval, {"status": "queued"}
        while body["status"] not in TERMINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GenerationTimeout(gen_id, timeout, body["status"])
            yield _Sleep(min(interval, left))
            interval = self._next_poll(interval)
            body = (yield from self._request("GET", f"/v1/generations/{gen_id}", deadline))[0].json()
        return body


# ---- editing (issue 22): the inputs as the API takes them ----------------------------------------

End = int | str | bytes  # an interpolation end: a seed, a latent (base64, as Encoding.latent_base64), a PNG


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _end(value: End) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, (int, str, bytes)):
        raise TypeError(f"an interpolation end is a seed (int), a latent (base64 str) or a PNG (bytes), got {value!r}")
    if isinstance(value, int):
        return {"seed": value}
    return {"noise": value} if isinstance(value, str) else {"image": _b64(value)}


@dataclass
class Edit:
    """What turns a generation into an edit: `image` (PNG bytes) to vary with `strength` in (0, 1]
    (None: the server's 1), `mask` (PNG bytes, white = regenerate) to inpaint; or `noise` (base64
    float32 latents, n of them, e.g. Encoding.latent_base64) in place of the seed's."""

    image: bytes | None = None
    strength: float | None = None
    mask: bytes | None = None
    noise: str | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.image is not None:
            out["image"] = _b64(self.image)
        if self.strength is not None:
            out["strength"] = self.strength
        if self.mask is not None:
            out["mask"] = _b64(self.mask)
        if self.noise is not None:
            out["noise"] = self.noise
        return out


@dataclass
class Encoding:
    """An image's noise latent (POST /v1/encodings): `latent_base64` float32 little-endian of `shape`;
    `roundtrip` (when asked for) the decoded image's error in grey levels and its PNG."""

    id: str
    model: str
    steps: int
    solver: str
    nfe: int
    shape: list[int]
    latent_base64: str
    roundtrip: dict[str, Any] | None = None

    @property
    def latent(self) -> Any:
        """The latent as a numpy array (C, H, W), float32."""
        import numpy as np

        return np.frombuffer(base64.b64decode(self.latent_base64), dtype="<f4").reshape(self.shape)

    @classmethod
    def from_body(cls, body: dict) -> Encoding:
        return cls(
            id=body["id"],
            model=body["model"],
            steps=body["steps"],
            solver=body["solver"],
            nfe=body["nfe"],
            shape=list(body["shape"]),
            latent_base64=body["latent_base64"],
            roundtrip=body.get("roundtrip"),
        )


# ---- the transports: drivers of the core ---------------------------------------------------------


class Client(_Base):
    """Synchronous client. Use as a context manager, or call `close()`.

    Keyword options: max_retries (8) and max_retry_wait (30 s) bound the 429/503 retries;
    poll_interval (0.1 s, growing to max_poll_interval, 1 s); request_timeout (30 s) per request;
    transport: an httpx transport (tests)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **kw: Any,
    ):
        super().__init__(base_url, api_key, **kw)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers(), timeout=self.request_timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _drive(self, flow: _Flow[Any], out: list[Any] | None = None) -> Iterator[GenerationEvent]:
        """Run an operation, blocking: yields its emitted events; its value appended to `out`."""
        run = _Runner(flow)
        with contextlib.ExitStack() as stream:
            try:
                while (effect := run.step()) is not None:
                    if isinstance(effect, _Emit):
                        yield effect.event
                    elif isinstance(effect, _Sleep):
                        time.sleep(effect.seconds)
                    else:
                        try:
                            run.answer = self._perform(effect, stream, run)
                        except httpx.TransportError as e:
                            stream.close()
                            run.error = e
            finally:
                flow.close()
        if out is not None:
            out.append(run.value)

    def _perform(self, effect: _Send | _Open | _Next, stream: contextlib.ExitStack, run: _Runner) -> Any:
        if isinstance(effect, _Send):
            return self._http.request(effect.method, effect.path, **effect.kw)
        if isinstance(effect, _Open):
            stream.close()
            source = stream.enter_context(connect_sse(self._http, "GET", effect.path, headers=effect.headers))
            if source.response.status_code >= 400:
                source.response.read()
            run.events = source.iter_sse()
            return source.response
        return next(run.events, None)

    def _call(self, flow: _Flow[_T]) -> _T:
        out: list[_T] = []
        for _ in self._drive(flow, out):
            pass
        return out[0]

    def models(self) -> list[dict]:
        """GET /v1/models."""
        return self._call(self._json("GET", "/v1/models"))

    def get(self, gen_id: str) -> dict:
        """GET /v1/generations/{id}: the generation's JSON body."""
        return self._call(self._json("GET", f"/v1/generations/{gen_id}"))

    def submit(
        self,
        model: str,
        steps: int | None = None,
        solver: str | None = None,
        seed: int | None = None,
        n: int = 1,
        *,
        wait: bool = False,
        timeout: float = 60.0,
        preview: bool = False,
        schedule: str | None = None,
        priority: str | None = None,
        webhook: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        edit: Edit | None = None,
    ) -> dict:
        """POST a generation; returns the API's body plus `retries`. With wait=True the server holds
        the request until done (up to its own wait timeout, then 202) and `timeout` bounds it here.
        preview=True: its events carry previews (see `events`). priority: "interactive" (the server's
        default) or "batch" (fills the device time interactive generations leave). webhook: a URL (or
        {"url", "events"}) the server POSTs the generation's events to, signed (Standard Webhooks).
        idempotency_key: the same key and body again answer the generation already made. edit: an
        input image with its strength and mask, or noise in place of the seed's (see `Edit`)."""
        return self._call(
            self._submit(
                self._body(model, steps, solver, seed, n, wait, schedule, preview, priority, webhook, edit),
                timeout,
                idempotency_key,
            )
        )

    def events(self, gen_id: str) -> Iterator[GenerationEvent]:
        """GET /v1/generations/{id}/events: the generation's events as they come, ending with the
        terminal one (finished, failed or canceled, its data the generation's body). A stream that
        breaks is resumed from the last event seen (Last-Event-ID), up to RESUMES times."""
        return self._drive(self._events(gen_id))

    def cancel(self, gen_id: str) -> dict:
        """DELETE /v1/generations/{id}: the generation's body (status canceled; or, while the worker
        has not confirmed it yet, its current status). A finished or failed one raises APIError 409."""
        return self._call(self._json("DELETE", f"/v1/generations/{gen_id}"))

    def generate(
        self,
        model: str,
        steps: int | None = None,
        solver: str | None = None,
        seed: int | None = None,
        n: int = 1,
        timeout: float = 300.0,
        wait: bool = True,
        on_event: Callable[[GenerationEvent], None] | None = None,
        preview: bool = False,
        schedule: str | None = None,
        priority: str | None = None,
        webhook: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        edit: Edit | None = None,
    ) -> GenerationResult:
        """Generate `n` images and return them (at most `timeout` seconds, retries included).

        wait=True (default) asks the server to answer when done (lowest latency) and polls only if it
        answers 202 first; wait=False submits and polls from the start. With `on_event` the
        generation is followed through its event stream instead, each event passed to it (progress
        bars; previews too with preview=True). webhook and idempotency_key: as for `submit`. `edit`:
        image-to-image, inpainting or given noise:

            client.generate("mnist", seed=3, edit=Edit(image=png, strength=0.5))
            client.generate("mnist", edit=Edit(image=png, mask=mask_png))   # white = regenerate
        """
        return self._call(
            self._generate(
                self._body(model, steps, solver, seed, n, wait, schedule, preview, priority, webhook, edit),
                timeout,
                on_event,
                idempotency_key,
            )
        )

    def encode(
        self,
        model: str,
        image: bytes,
        steps: int | None = None,
        solver: str | None = None,
        *,
        roundtrip: bool = False,
        timeout: float = 300.0,
    ) -> Encoding:
        """POST /v1/encodings: the noise latent that generates the PNG `image` (the ODE run towards
        noise); roundtrip=True also decodes it and reports the error (Encoding.roundtrip)."""
        return self._call(self._encode(model, image, steps, solver, roundtrip, timeout))

    def interpolate(
        self,
        model: str,
        start: End,
        end: End,
        frames: int = 8,
        steps: int | None = None,
        solver: str | None = None,
        *,
        schedule: str | None = None,
        timeout: float = 300.0,
    ) -> GenerationResult:
        """POST /v1/interpolations: `frames` images between two seeds (int), two latents (base64 str)
        or two PNGs (bytes), ends included."""
        body = self._interpolation(model, start, end, frames, steps, solver, schedule)
        return self._call(self._generate(body, timeout, path="/v1/interpolations"))


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same methods and options, awaited. Use `async with`, or
    `await aclose()`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **kw: Any,
    ):
        super().__init__(base_url, api_key, **kw)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), timeout=self.request_timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _drive(self, flow: _Flow[Any], out: list[Any] | None = None) -> AsyncIterator[GenerationEvent]:
        """Run an operation, awaited: yields its emitted events; its value appended to `out`."""
        run = _Runner(flow)
        async with contextlib.AsyncExitStack() as stream:
            try:
                while (effect := run.step()) is not None:
                    if isinstance(effect, _Emit):
                        yield effect.event
                    elif isinstance(effect, _Sleep):
                        await asyncio.sleep(effect.seconds)
                    else:
                        try:
                            run.answer = await self._perform(effect, stream, run)
                        except httpx.TransportError as e:
                            await stream.aclose()
                            run.error = e
            finally:
                flow.close()
        if out is not None:
            out.append(run.value)

    async def _perform(self, effect: _Send | _Open | _Next, stream: contextlib.AsyncExitStack, run: _Runner) -> Any:
        if isinstance(effect, _Send):
            return await self._http.request(effect.method, effect.path, **effect.kw)
        if isinstance(effect, _Open):
            await stream.aclose()
            source = await stream.enter_async_context(
                aconnect_sse(self._http, "GET", effect.path, headers=effect.headers)
            )
            if source.response.status_code >= 400:
                await source.response.aread()
            run.events = source.aiter_sse()
            return source.response
        return await anext(run.events, None)

    async def _call(self, flow: _Flow[_T]) -> _T:
        out: list[_T] = []
        async for _ in self._drive(flow, out):
            pass
        return out[0]

    async def models(self) -> list[dict]:
        return await self._call(self._json("GET", "/v1/models"))

    async def get(self, gen_id: str) -> dict:
        return await self._call(self._json("GET", f"/v1/generations/{gen_id}"))

    async def submit(
        self,
        model: str,
        steps: int | None = None,
        solver: str | None = None,
        seed: int | None = None,
        n: int = 1,
        *,
        wait: bool = False,
        timeout: float = 60.0,
        preview: bool = False,
        schedule: str | None = None,
        priority: str | None = None,
        webhook: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        edit: Edit | None = None,
    ) -> dict:
        return await self._call(
            self._submit(
                self._body(model, steps, solver, seed, n, wait, schedule, preview, priority, webhook, edit),
                timeout,
                idempotency_key,
            )
        )

    def events(self, gen_id: str) -> AsyncIterator[GenerationEvent]:
        """`async for ev in client.events(id)`: as Client.events."""
        return self._drive(self._events(gen_id))

    async def cancel(self, gen_id: str) -> dict:
        return await self._call(self._json("DELETE", f"/v1/generations/{gen_id}"))

    async def generate(
        self,
        model: str,
        steps: int | None = None,
        solver: str | None = None,
        seed: int | None = None,
        n: int = 1,
        timeout: float = 300.0,
        wait: bool = True,
        schedule: str | None = None,
        priority: str | None = None,
        webhook: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        edit: Edit | None = None,
    ) -> GenerationResult:
        return await self._call(
            self._generate(
                self._body(model, steps, solver, seed, n, wait, schedule, False, priority, webhook, edit),
                timeout,
                idempotency_key=idempotency_key,
            )
        )

    async def encode(
        self,
        model: str,
        image: bytes,
        steps: int | None = None,
        solver: str | None = None,
        *,
        roundtrip: bool = False,
        timeout: float = 300.0,
    ) -> Encoding:
        return await self._call(self._encode(model, image, steps, solver, roundtrip, timeout))

    async def interpolate(
        self,
        model: str,
        start: End,
        end: End,
        frames: int = 8,
        steps: int | None = None,
        solver: str | None = None,
        *,
        schedule: str | None = None,
        timeout: float = 300.0,
    ) -> GenerationResult:
        body = self._interpolation(model, start, end, frames, steps, solver, schedule)
        return await self._call(self._generate(body, timeout, path="/v1/interpolations"))
