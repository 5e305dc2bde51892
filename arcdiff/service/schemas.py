"""Request and response bodies of the HTTP API (pydantic v2, strict).

Requests forbid unknown fields and take numbers only as JSON integers (no "10", 10.0 or true).
The request schema is built per app (`generation_request`), so the OpenAPI document states the
real limits: the models this deployment serves and its largest n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from arcdiff.contract import (
    DEFAULT_PRIORITY,
    LATENT_DTYPE,
    MAX_INPUT_PNG_BYTES,
    MAX_STEPS,
    PRIORITIES,
    SEED_MAX,
    SOLVER_NAMES,
)
from arcdiff.model.solver_names import (
    DEFAULT_ENCODE_SOLVER,
    DEFAULT_ENCODE_STEPS,
    DEFAULT_NFE,
    DEFAULT_SCHEDULE,
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    ENCODE_SOLVERS,
    FEW_STEPS_MAX,
    FEW_STEPS_SOLVER,
    GRIDS,
    SOLVER_TABLE,
    SOLVERS,
    nfe_by_solver,
    solvers_with_grid,
)
from arcdiff.service.webhook_targets import MAX_URL_LENGTH, check_url

Solver = Literal[SOLVERS]  # type: ignore[valid-type]  # the names of model.solver_names
Schedule = Literal[GRIDS]  # type: ignore[valid-type]
Priority = Literal[PRIORITIES]  # type: ignore[valid-type]
EncodeSolver = Literal[ENCODE_SOLVERS]  # type: ignore[valid-type]
Status = Literal["queued", "running", "finished", "failed", "canceled"]
MAX_IMAGES_CAP = 256
WEBHOOK_EVENTS = ("queued", "finished", "failed", "canceled")
DEFAULT_WEBHOOK_EVENTS = ("finished", "failed", "canceled")
WebhookEvent = Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]
PNG_B64_MAX = 4 * (MAX_INPUT_PNG_BYTES + 2) // 3 + 4  # base64 of the largest input PNG
LATENT_B64_MAX = 4 * (MAX_IMAGES_CAP * 3 * 64 * 64 * 4) // 3 + 4  # a bound only: the body limit applies first

# help texts written from solver_names.SOLVER_TABLE, so they name every solver and its default grid
SOLVER_HELP = "; ".join(f"{s.name}: {s.summary}" for s in SOLVER_TABLE)
GRID_DEFAULTS_HELP = "; ".join(f"{g} for {', '.join(solvers_with_grid(g))}" for g in GRIDS if solvers_with_grid(g))


class WebhookIn(BaseModel):
    """Where to POST a generation's events (signed with Standard Webhooks), and which ones."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        strict=True,
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http or https URL the events are POSTed to; private, loopback and link-local hosts are "
        "refused unless the server allows them",
        json_schema_extra={"format": "uri"},
    )
    events: list[WebhookEvent] = Field(
        list(DEFAULT_WEBHOOK_EVENTS),
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        description="the events to send, among queued, finished, failed and canceled (default: the last three)",
    )

    @field_validator("url")
    @classmethod
    def _url_form(cls, v: str) -> str:
        check_url(v)  # ValueError names the problem; the host's addresses are checked by the route
        return v

    @field_validator("events")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each event at most once")
        return v


class GenerationRequest(BaseModel):
    """POST /v1/generations."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "mnist", "n": 4, "wait": True},
                {
                    "model": "mnist",
                    "steps": 10,
                    "solver": "rk4",
                    "schedule": "uniform",
                    "seed": 7,
                    "n": 4,
                    "wait": True,
                },
            ]
        },
    )

    model: str = Field(description="a model from GET /v1/models")
    # optional, and null is not a value: omit a field to get its default (the default is not validated)
    steps: int = Field(  # type: ignore[assignment]
        None,
        strict=True,
        ge=1,
        le=MAX_STEPS,
        description="solver steps (network evaluations = steps x stages). Omitted: about "
        f"{DEFAULT_NFE} network evaluations of the solver",
    )
    solver: Solver = Field(
        None,
        description=f"{SOLVER_HELP}. Omitted: the measured default "
        f"({DEFAULT_SOLVER}, {DEFAULT_STEPS} steps, {DEFAULT_SCHEDULE}; {FEW_STEPS_SOLVER} for at most "
        f"{FEW_STEPS_MAX} steps; see GET /v1/models)",
    )
    schedule: Schedule = Field(
        None,
        description="the time grid: uniform (in eta, the paper's), logsnr (uniform in log cot eta) or karras "
        f"(in tan eta; range and rho per step count). Omitted: the solver's own default, {GRID_DEFAULTS_HELP}",
    )
    seed: int | None = Field(
        None,
        strict=True,
        ge=0,
        le=SEED_MAX,
        description="seed of image 0; image k uses (seed + k) mod 2^32. Omitted: the server picks one and returns it",
    )
    n: int = Field(1, strict=True, ge=1, le=MAX_IMAGES_CAP, description="number of images")
    wait: bool = Field(
        False,
        strict=True,
        description="hold the request until the images are done (bounded by the server's wait timeout, then 202)",
    )
    preview: bool = Field(
        False,
        strict=True,
        description="send previews on GET /v1/generations/{id}/events while it runs: each image's current "
        "x0_hat (the model's clean estimate, at no extra network evaluation) as a small PNG",
    )
    priority: Priority = Field(
        DEFAULT_PRIORITY,
        description="interactive (default): runs first, its network evaluations kept short; batch: fills the "
        "device time interactive images leave (on a CPU it pauses while they run)",
    )
    webhook: WebhookIn = Field(  # type: ignore[assignment]
        None,
        description="POST the generation's events to this URL, signed with Standard Webhooks (webhook-id, "
        "webhook-timestamp, webhook-signature); retried with backoff, each attempt shown in the generation's "
        "`webhook`",
    )
    # ---- editing (issue 22): all optional; without them a request is a plain generation ----------
    image: str = Field(  # type: ignore[assignment]
        None,
        max_length=PNG_B64_MAX,
        description="image-to-image: a PNG (base64) of the model's size and channels (L for 1 channel, RGB for 3), "
        "in place of pure noise. Each image k starts from it noised with its own seed's noise",
    )
    strength: float = Field(  # type: ignore[assignment]
        None,
        strict=True,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="with image: how much to change it, in (0, 1] (default 1: a new image from the input's noised "
        "end). The edit runs the last floor(strength x steps) steps of the grid (at least 1), from the grid point "
        "there (uniform grid: eta0 = strength x pi/2 rounded down to a step); nfe counts only those",
    )
    mask: str = Field(  # type: ignore[assignment]
        None,
        max_length=PNG_B64_MAX,
        description="with image: inpainting. A greyscale PNG (base64) of the image's size: white (255) regenerate, "
        "black keep (grey: blend). The kept pixels come back exactly",
    )
    noise: str = Field(  # type: ignore[assignment]
        None,
        max_length=LATENT_B64_MAX,
        description="the start noise of each image in place of the seed's: n latents of the model's shape (C, H, W), "
        "float32 little-endian, C order, concatenated and base64-encoded (e.g. an encoding's latent_base64); "
        "not with image",
    )


def generation_request(models: Sequence[str], max_images: int) -> type[GenerationRequest]:
    """The request schema of one deployment: `model` one of `models`, `n` at most `max_images`."""
    fields: dict = {
        "n": (int, Field(1, strict=True, ge=1, le=max_images, description=f"number of images, 1..{max_images}")),
    }
    if models:
        fields["model"] = (Literal[tuple(models)], Field(description="a model from GET /v1/models"))
        return create_model("GenerationRequest", __base__=GenerationRequest, **fields)

    class NoModels(GenerationRequest):
        @field_validator("model")
        @classmethod
        def _none_served(cls, v: str) -> str:
            raise ValueError("no models are served here")

    return create_model("GenerationRequest", __base__=NoModels, **fields)


class ImageOut(BaseModel):
    index: int = Field(description="k: the image's index in the request")
    seed: int = Field(
        description="the image's own seed, (seed + k) mod 2^32: ask for it with n=1 to get this image again"
    )
    png_base64: str = Field(description="the PNG, base64")
    url: str = Field(description="the raw PNG")


class LatencyOut(BaseModel):
    queue_ms: float = Field(description="acceptance to the first image entering the batch")
    sample_ms: float = Field(description="first image entering the batch to the last one leaving it")
    encode_ms: float = Field(description="last image leaving the batch to the last PNG encoded")
    total_ms: float = Field(description="acceptance to done")
    nfe: int = Field(description="network evaluations per image")
    batch_sizes: list[int] = Field(description="the batch sizes (images per network evaluation) the generation ran in")
    device: str
    worker: str


class WebhookAttemptOut(BaseModel):
    at: str = Field(description="when the attempt started (ISO 8601, UTC)")
    status_code: int | None = Field(None, description="the receiver's HTTP status (2xx: delivered)")
    error: str | None = Field(None, description="why no answer came (connection refused, timeout, refused host)")
    duration_ms: float = Field(description="how long the attempt took")


class WebhookDeliveryOut(BaseModel):
    event: WebhookEvent
    message_id: str = Field(description="the webhook-id header: the same on every attempt of this delivery")
    state: Literal["pending", "delivered", "failed"] = Field(
        description="pending: not yet answered with 2xx and attempts left; delivered; failed: out of attempts "
        "(or the host was refused)"
    )
    attempts: list[WebhookAttemptOut] = Field(default_factory=list)
    next_attempt_at: str | None = Field(None, description="when a pending delivery is tried next (ISO 8601, UTC)")


class WebhookOut(BaseModel):
    url: str
    events: list[WebhookEvent]
    deliveries: list[WebhookDeliveryOut] = Field(
        default_factory=list, description="one per event that has happened and was asked for"
    )


class GenerationOut(BaseModel):
    id: str
    status: Status
    url: str
    model: str
    steps: int
    solver: str
    schedule: str = Field(description="the time grid the images were sampled on")
    priority: str = Field(DEFAULT_PRIORITY, description="interactive or batch")
    seed: int
    n: int
    nfe: int = Field(description="network evaluations per image")
    error: str | None = Field(None, description="why a failed generation failed (or who canceled one)")
    images: list[ImageOut] = Field(default_factory=list, description="when finished")
    metrics: LatencyOut | None = Field(None, description="latency record, when finished")
    workers: int | None = Field(
        None,
        description="in the answer to a POST that is not done: live workers serving the model (0: the generation "
        "waits in the queue until one starts)",
    )
    webhook: WebhookOut | None = Field(None, description="the request's webhook and each delivery's attempts")
    # ---- editing (issue 22) ----
    kind: Literal["generate", "edit", "encode", "interpolate"] = Field(
        "generate",
        description="generate (from noise), edit (image-to-image or inpainting), encode (POST /v1/encodings: the "
        "image's noise latent), interpolate (POST /v1/interpolations: n frames between two ends)",
    )
    strength: float = Field(1.0, description="an edit's strength (1 otherwise)")
    seed_to: int | None = Field(None, description="an interpolation between two seeds: the second seed")
    latents: list[str] | None = Field(
        None,
        description="an encoding's latent: float32 little-endian (C, H, W), base64 (its images[0] is a picture of it, "
        "grey = 0, black/white = -3/+3)",
    )


class EncodingRequest(BaseModel):
    """POST /v1/encodings."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "mnist", "image": "<PNG base64>", "roundtrip": True}]}
    )

    model: str = Field(description="a model from GET /v1/models")
    image: str = Field(max_length=PNG_B64_MAX, description="the PNG (base64) to encode: the model's size and channels")
    steps: int = Field(DEFAULT_ENCODE_STEPS, strict=True, ge=1, le=MAX_STEPS, description="solver steps")
    solver: EncodeSolver = Field(
        DEFAULT_ENCODE_SOLVER,
        description="a deterministic one-step solver: the ODE runs from eta = 0 up to pi/2 (ddim: DDIM inversion)",
    )
    schedule: Schedule = Field("uniform", description="the time grid, read backwards")
    roundtrip: bool = Field(
        False,
        strict=True,
        description="also decode the latent with the same solver, steps and grid, and report the RMS error against "
        "the input in grey levels (costs a second run of the same NFE)",
    )
    wait: bool = Field(True, strict=True, description="hold the request until done (else 202: poll its url)")
    priority: Priority = Field(DEFAULT_PRIORITY)


class RoundTripOut(BaseModel):
    rms_grey: float = Field(description="RMS difference of the decoded image from the input, grey levels (0-255)")
    max_grey: int = Field(description="largest difference of one pixel, grey levels")
    png_base64: str = Field(description="the decoded image")
    id: str = Field(description="the decoding generation")


class EncodingOut(BaseModel):
    id: str
    status: Status
    url: str = Field(description="the encoding as a generation (GET it: its latents)")
    model: str
    steps: int
    solver: str
    schedule: str
    nfe: int = Field(description="network evaluations of the encoding")
    shape: list[int] = Field(description="the latent's shape (C, H, W)")
    dtype: str = Field(LATENT_DTYPE, description="numpy dtype of latent_base64: float32 little-endian")
    latent_base64: str | None = Field(
        None, description="the latent, float32 little-endian C order, base64: the noise that decodes to the image"
    )
    png_base64: str | None = Field(None, description="a picture of the latent (grey 0, black/white -3/+3)")
    roundtrip: RoundTripOut | None = Field(None, description="with roundtrip=true, when the decoding finished in time")
    error: str | None = None
    metrics: LatencyOut | None = None


class InterpolationEnd(BaseModel):
    """One end of an interpolation: exactly one of seed, noise, image (both ends the same kind)."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, strict=True, ge=0, le=SEED_MAX, description="a seed's noise")
    noise: str | None = Field(
        None, max_length=LATENT_B64_MAX, description="a latent: float32 little-endian (C, H, W), base64"
    )
    image: str | None = Field(None, max_length=PNG_B64_MAX, description="a PNG (base64), encoded first")


class InterpolationRequest(BaseModel):
    """POST /v1/interpolations."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "mnist", "start": {"seed": 1}, "end": {"seed": 2}, "frames": 8, "wait": True}]
        },
    )

    model: str = Field(description="a model from GET /v1/models")
    start: InterpolationEnd
    end: InterpolationEnd
    frames: int = Field(8, strict=True, ge=2, le=MAX_IMAGES_CAP, description="images from start to end, ends included")
    steps: int = Field(DEFAULT_ENCODE_STEPS, strict=True, ge=1, le=MAX_STEPS, description="solver steps")
    solver: Solver = Field(
        DEFAULT_ENCODE_SOLVER,
        description="a deterministic solver (between two images one that encodes: "
        f"{', '.join(ENCODE_SOLVERS)}); frames are slerp(start, end, t) decoded",
    )
    schedule: Schedule = Field("uniform", description="the time grid")
    wait: bool = Field(False, strict=True, description="hold the request until done")
    priority: Priority = Field(DEFAULT_PRIORITY)


class ModelOut(BaseModel):
    name: str
    image_size: int
    channels: int
    prediction: str = Field(description="x0_eps (dual head), eps, x0 or v")
    parameters: int
    solvers: list[str] = list(SOLVER_NAMES)
    workers: int | None = Field(
        None,
        description="live workers serving the model (embedded: 1 once loaded); 0: generations wait in the queue "
        "until one starts; null: unknown (Redis unreachable)",
    )
    schedules: list[str] = Field(list(GRIDS), description="the time grids a request may name")
    nfe_per_step: dict[str, int] = Field(nfe_by_solver(), description="network evaluations per step, per solver")
    defaults: dict[str, str | int] = Field(
        {"solver": DEFAULT_SOLVER, "steps": DEFAULT_STEPS, "schedule": DEFAULT_SCHEDULE},
        description="what a request for this model that omits solver, steps and schedule gets",
    )
    few_steps_default: dict[str, str | int] = Field(
        {"solver": FEW_STEPS_SOLVER, "max_steps": FEW_STEPS_MAX},
        description="the solver a request gets that names at most max_steps steps and no solver",
    )
    default_schedules: dict[str, str] = Field(
        {s.name: s.default_grid for s in SOLVER_TABLE},
        description="per solver: the time grid a request that names the solver and no schedule gets",
    )
    distilled: dict[str, Any] | None = Field(
        None,
        description="a few-step student (`arcdiff distill`): its teacher and the solver, steps and schedule it was "
        "distilled for, which a request that leaves them out gets, and its measured quality beside the teacher's "
        "(`quality`: Frechet distances per feature space, from `arcdiff eval sets`) (null: not distilled)",
    )


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    mode: Literal["embedded", "redis"]
    reason: str | None = None
    workers: dict[str, int] | None = Field(None, description="when ready: live workers per model (0: scaled to zero)")


class ErrorOut(BaseModel):
    message: str = Field(description="what went wrong")
    detail: str = Field(description="the same text (FastAPI's field name)")


class ConflictOut(BaseModel):
    message: str = Field(description="why the generation cannot be canceled")
    detail: str
    status: Status = Field(description="the generation's final status")


class ValidationErrorOut(BaseModel):
    message: str = Field(description="every problem, each prefixed with its field")
    detail: list[dict] = Field(description="FastAPI's validation errors (loc names the field)")
