"""What travels between the API and the workers: the generation spec, its queue, and its result.

Everything here is plain JSON (RQ's JSON serializer; never pickle, since Redis may be reachable
by others). A worker re-checks every spec it dequeues: a malformed job fails with the reason
instead of reaching the engine. No torch imports: the API uses this module too.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

from arcdiff.model.solver_names import ENCODE_SOLVERS, GRIDS, SOLVER_INFO, SOLVERS, edit_steps
from arcdiff.model.solver_names import nfe as solver_nfe

QUEUE_PREFIX = "arcdiff:"
# the RQ function name a generation job carries; stock RQ workers can run it (arcdiff/worker/tasks.py),
# the batching worker reads its arguments and never imports it
TASK = "arcdiff.worker.tasks.generate"
MAX_STEPS = 1000
SEED_MAX = 2**32 - 1
SOLVER_NAMES = SOLVERS  # model.solvers.SOLVERS (from its torch-free name list)
SCHEDULE_NAMES = GRIDS
# a generation's priority: interactive images run first and keep their ticks short; batch images fill
# what is left (arcdiff/worker/scheduler.py). Specs without the field (older APIs) are interactive.
PRIORITIES = ("interactive", "batch")
DEFAULT_PRIORITY = "interactive"
BATCH_QUEUE_SUFFIX = ":batch"  # model names have no ':' (model.registry.NAME_PATTERN): no clash
CLIENT_MAX = 64  # characters of a spec's client id


# each generation's events (queued, progress, preview, then one terminal marker) go to a Redis stream
# that the worker and the API append to and any API process reads; bounded and expiring
EVENTS_PREFIX = "arcdiff:events:"
EVENTS_MAXLEN = 1000  # entries kept per generation (approximate trim; previews are the bulk)
TERMINAL_EVENTS = ("finished", "failed", "canceled")
# once a generation has ended its stream lives this long at most (its previews are the bulk of
# Redis memory); a reader after that gets the end from the job's status instead
ENDED_EVENTS_TTL_S = 300


def events_key(gen_id: str) -> str:
    return EVENTS_PREFIX + gen_id


def add_event(pipe: Any, gen_id: str, event: str, data: dict[str, Any], ttl_s: int) -> None:
    """Queue one event on a Redis pipeline: XADD with a length bound, and a TTL on the stream."""
    key = events_key(gen_id)
    pipe.xadd(key, {"event": event, "data": json.dumps(data)}, maxlen=EVENTS_MAXLEN, approximate=True)
    pipe.expire(key, min(ttl_s, ENDED_EVENTS_TTL_S) if event in TERMINAL_EVENTS else ttl_s)


class SpecError(ValueError):
    """A generation spec that cannot run; the message names the field."""


def queue_name(model: str, priority: str = DEFAULT_PRIORITY) -> str:
    """Two RQ queues per model, so a worker listens only for the models it holds and takes
    interactive generations first: arcdiff:<model> (interactive; the one older APIs fill) and
    arcdiff:<model>:batch."""
    return QUEUE_PREFIX + model + (BATCH_QUEUE_SUFFIX if priority == "batch" else "")


def queue_model(name: str) -> tuple[str, str]:
    """(model, priority) of a queue named by queue_name."""
    model = name.removeprefix(QUEUE_PREFIX)
    if model.endswith(BATCH_QUEUE_SUFFIX):
        return model.removesuffix(BATCH_QUEUE_SUFFIX), "batch"
    return model, DEFAULT_PRIORITY


@dataclass(frozen=True)
class GenerationSpec:
    id: str
    model: str
    steps: int
    solver: str
    seed: int
    n: int
    submitted_at: float  # time.time() when the API accepted it
    preview: bool = False  # send x0_hat previews while it runs (absent in older payloads)
    schedule: str = "uniform"  # the time grid (model.solver_names.GRIDS); absent in older payloads
    priority: str = DEFAULT_PRIORITY  # PRIORITIES; absent in older payloads
    # who asked, for the engine's per-client cap: not a secret ("key:" + 16 hex digits of the SHA-256
    # of the API key, or "addr:" + the client's address without keys); absent in older payloads
    client: str = ""
    # ---- editing (issue 22); absent in older payloads: a plain generation. KINDS says what each
    # kind carries; check_kind() the combinations, decode_inputs() the payloads against the model
    kind: str = "generate"
    image: str = ""  # PNG, base64: the input of an edit or an encoding
    strength: float = 1.0  # edit: runs the last edit_steps(steps, strength) steps of the grid
    mask: str = ""  # PNG, base64, white (255) = regenerate, black = keep (inpainting)
    noise: str = ""  # latents, base64 float32 little-endian (C, H, W) each: n (generate) or the 2 ends (interpolate)
    seed_to: int | None = None  # interpolate: the noise of seed and of seed_to are the ends

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: Any) -> GenerationSpec:
        """Parse and check a payload from the queue (strict: exact types, known fields, ranges)."""
        if not isinstance(payload, dict):
            raise SpecError(f"payload must be an object, got {type(payload).__name__}")
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(payload) - names)
        if unknown:
            raise SpecError(f"unknown field(s): {', '.join(unknown)}")
        optional = {f.name for f in cls.__dataclass_fields__.values() if f.default is not MISSING}
        missing = sorted(names - set(payload) - optional)
        if missing:
            raise SpecError(f"missing field(s): {', '.join(missing)}")
        cls._check_types(payload)
        spec = cls(**payload)
        spec._check_values()
        return spec

    @staticmethod
    def _check_types(payload: dict[str, Any]) -> None:
        """Each field's exact type (a bool is no integer here)."""
        for key in ("id", "model", "solver", "schedule", "priority"):
            if key in payload and (not isinstance(payload[key], str) or not payload[key]):
                raise SpecError(f"{key} must be a non-empty string")
        if not isinstance(payload.get("client", ""), str) or len(payload.get("client", "")) > CLIENT_MAX:
            raise SpecError(f"client must be a string of at most {CLIENT_MAX} characters")
        for key in ("steps", "seed", "n"):
            if type(payload[key]) is not int:
                raise SpecError(f"{key} must be an integer")
        if type(payload.get("preview", False)) is not bool:
            raise SpecError("preview must be a boolean")
        if not isinstance(payload["submitted_at"], (int, float)) or not math.isfinite(payload["submitted_at"]):
            raise SpecError("submitted_at must be a number")
        GenerationSpec._check_edit_types(payload)

    @staticmethod
    def _check_edit_types(payload: dict[str, Any]) -> None:
        """The editing fields' exact types (issue 22)."""
        for key in ("kind", "image", "mask", "noise"):
            if not isinstance(payload.get(key, ""), str):
                raise SpecError(f"{key} must be a string")
        strength = payload.get("strength", 1.0)
        if type(strength) not in (int, float) or not math.isfinite(strength):
            raise SpecError("strength must be a number")
        if payload.get("seed_to") is not None and type(payload["seed_to"]) is not int:
            raise SpecError("seed_to must be an integer")

    def _check_values(self) -> None:
        """Ranges and names."""
        spec = self
        if not 1 <= spec.steps <= MAX_STEPS:
            raise SpecError(f"steps must be in 1..{MAX_STEPS}, got {spec.steps}")
        if not 0 <= spec.seed <= SEED_MAX:
            raise SpecError(f"seed must be in 0..{SEED_MAX}, got {spec.seed}")
        if spec.n < 1:
            raise SpecError(f"n must be at least 1, got {spec.n}")
        if spec.solver not in SOLVER_NAMES:
            raise SpecError(f"unknown solver {spec.solver!r}")
        if spec.schedule not in SCHEDULE_NAMES:
            raise SpecError(f"unknown schedule {spec.schedule!r}")
        if spec.priority not in PRIORITIES:
            raise SpecError(f"priority must be one of {', '.join(PRIORITIES)}, got {spec.priority!r}")
        check_kind(spec)


# ---- editing (issue 22) ------------------------------------------------------------------------

KINDS = ("generate", "edit", "encode", "interpolate")
MAX_INPUT_PNG_BYTES = 1 << 20  # an input PNG (image or mask), decoded from base64
MAX_INPUT_PIXELS = 1 << 22  # PIL refuses to open larger images (decompression bombs)
LATENT_DTYPE = "<f4"  # latents travel as float32 little-endian, C order (C, H, W) each, base64
LATENT_RANGE = (-3.0, 3.0)  # the grey scale of an encoding's PNG (a picture of its latent)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MODES = {1: ("L",), 3: ("RGB",)}  # what an input image may be, by the model's channels
_MASK_MODES = ("L", "1")


def check_kind(spec: GenerationSpec) -> None:
    """What a spec of each kind must and must not carry (the model's sizes are checked by
    decode_inputs, where they are known):
    generate: optional noise (n latents) in place of the seed's;
    edit: image, strength in (0, 1], optional mask; its start noise comes from the seed;
    encode: image, n = 1, a solver that runs backwards (solver_names.ENCODE_SOLVERS);
    interpolate: n >= 2 frames between the ends: the noise of seed and seed_to, or two latents in
    noise; a deterministic solver (a stochastic one would draw other noise in every frame)."""
    k = spec.kind
    if k not in KINDS:
        raise SpecError(f"kind must be one of {', '.join(KINDS)}, got {k!r}")
    if not 0 < spec.strength <= 1:
        raise SpecError(f"strength must be in (0, 1], got {spec.strength}")
    if spec.strength != 1 and k != "edit":
        raise SpecError("strength applies only to an edit (an input image)")
    if spec.seed_to is not None and not 0 <= spec.seed_to <= SEED_MAX:
        raise SpecError(f"seed_to must be in 0..{SEED_MAX}, got {spec.seed_to}")
    if (spec.seed_to is not None) != (k == "interpolate" and not spec.noise):
        raise SpecError("seed_to is the other end of an interpolation between two seeds, and only that")
    if bool(spec.image) != (k in ("edit", "encode")):
        raise SpecError("image is the input of an edit or an encoding, and only that")
    if spec.mask and k != "edit":
        raise SpecError("mask applies only to an edit (an input image)")
    if spec.noise and k not in ("generate", "interpolate"):
        raise SpecError("noise replaces the seed's noise of a generation or an interpolation; an edit draws its own")
    if k == "encode":
        if spec.n != 1:
            raise SpecError(f"an encoding has one image, n must be 1, got {spec.n}")
        if spec.solver not in ENCODE_SOLVERS:
            raise SpecError(
                f"solver {spec.solver!r} cannot encode (integrate towards noise); "
                f"use one of {', '.join(ENCODE_SOLVERS)}"
            )
    if k == "interpolate":
        if spec.n < 2:
            raise SpecError(f"an interpolation needs at least 2 frames, n must be >= 2, got {spec.n}")
        if SOLVER_INFO[spec.solver].stochastic:
            raise SpecError(
                f"solver {spec.solver!r} is stochastic: its frames would not lie on one path; "
                "use a deterministic solver"
            )


def spec_nfe(spec: GenerationSpec) -> int:
    """Network evaluations per image: an edit runs only the tail of its grid."""
    steps = edit_steps(spec.steps, spec.strength) if spec.kind == "edit" else spec.steps
    return solver_nfe(spec.solver, steps)


@dataclass
class EditInputs:
    """A spec's decoded inputs (numpy arrays): image uint8 (C, H, W), mask float32 (C, H, W) in
    [0, 1] (1 regenerate), latents float32 (k, C, H, W)."""

    image: Any = None
    mask: Any = None
    latents: Any = None


def decode_png(data: str, shape: tuple[int, int, int], what: str, model: str = "the model") -> Any:
    """A base64 PNG -> uint8 (C, H, W) for a model of `shape`, or SpecError naming `what`. The
    header is read and its size checked before any pixel is decoded (no decompression bomb gets
    past it, and PIL's own bound is set lower as well); nothing touches the disk."""
    import io

    import numpy as np
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise SpecError(f"{what} is not valid base64") from None
    if len(raw) > MAX_INPUT_PNG_BYTES:
        raise SpecError(f"{what} is {len(raw)} bytes, more than {MAX_INPUT_PNG_BYTES}")
    if not raw.startswith(_PNG_SIGNATURE):
        raise SpecError(f"{what} is not a PNG (base64 of a PNG file expected)")
    c, h, w = shape
    # the size from the IHDR chunk, which a PNG must start with, before PIL sees a byte of it
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        raise SpecError(f"{what} is not a readable PNG: no IHDR header")
    size = struct.unpack(">II", raw[16:24])
    if size != (w, h):
        raise SpecError(f"{what} is {size[0]}x{size[1]} pixels; {model} takes {w}x{h} images")
    modes = _MASK_MODES if what == "mask" else _MODES.get(c, ())
    Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or MAX_INPUT_PIXELS, MAX_INPUT_PIXELS)
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            if im.size != (w, h):
                raise SpecError(f"{what} is {im.size[0]}x{im.size[1]} pixels; {model} takes {w}x{h} images")
            if im.mode not in modes:
                raise SpecError(
                    f"{what} has mode {im.mode}; {model} takes "
                    + ("a greyscale (L) mask" if what == "mask" else f"{c}-channel {' or '.join(modes)} PNGs")
                )
            im.load()
            arr = np.asarray(im.convert("L") if im.mode == "1" else im)
    except SpecError:
        raise
    except Exception as e:  # a truncated or corrupt PNG, or a bomb PIL refused
        raise SpecError(f"{what} is not a readable PNG: {type(e).__name__}") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if what == "mask" and c > 1:
        arr = np.repeat(arr, c, axis=0)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def encode_latents(latents: Any) -> str:
    """float latents (k, C, H, W) -> base64 of float32 little-endian."""
    import numpy as np

    return base64.b64encode(np.ascontiguousarray(latents, dtype=LATENT_DTYPE).tobytes()).decode("ascii")


def decode_latents(data: str, count: int, shape: tuple[int, int, int], what: str = "noise") -> Any:
    """base64 float32 little-endian -> (count, C, H, W) float32, or SpecError."""
    import numpy as np

    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise SpecError(f"{what} is not valid base64") from None
    size = count * shape[0] * shape[1] * shape[2]
    if len(raw) != 4 * size:
        raise SpecError(
            f"{what} must be {count} latent(s) of shape {'x'.join(map(str, shape))} as float32 little-endian "
            f"({4 * size} bytes), got {len(raw)} bytes"
        )
    arr = np.frombuffer(raw, dtype=LATENT_DTYPE).astype(np.float32).reshape(count, *shape)
    if not np.isfinite(arr).all():
        raise SpecError(f"{what} holds NaN or infinite values")
    return arr


def decode_inputs(spec: GenerationSpec, shape: tuple[int, int, int], model: str | None = None) -> EditInputs | None:
    """The spec's image, mask and latents checked against a model of `shape` (C, H, W); None for
    a plain generation. The API calls it before queueing, the engine again before admitting."""
    if spec.kind == "generate" and not spec.noise:
        return None
    import numpy as np

    name = f"model {model or spec.model}"
    out = EditInputs()
    if spec.image:
        out.image = decode_png(spec.image, shape, "image", name)
    if spec.mask:
        out.mask = decode_png(spec.mask, shape, "mask", name).astype(np.float32) / 255.0
    if spec.noise:
        out.latents = decode_latents(spec.noise, spec.n if spec.kind == "generate" else 2, shape)
    return out


def queue_expiry(spec: GenerationSpec, queue_timeout_s: float | None, now: float) -> str | None:
    """Why a generation that has not started by `now` (time.time()) is expired, or None while it may
    still start. Time spent in Redis counts (submitted_at is when the API accepted it). Both sides
    apply it: the worker does not start an expired generation, the API shows it failed."""
    waited = now - spec.submitted_at
    if queue_timeout_s and waited > queue_timeout_s:
        return (
            f"expired: waited {waited:.1f} s to start, longer than the queue timeout of "
            f"{queue_timeout_s:g} s (ARCDIFF_QUEUE_TIMEOUT_S)"
        )
    return None


@dataclass
class ImageResult:
    index: int
    seed: int
    png: bytes


@dataclass
class JobMetrics:
    queue_ms: float
    sample_ms: float
    encode_ms: float
    total_ms: float
    nfe: int
    batch_sizes: list[int]
    device: str
    worker: str


@dataclass
class JobResult:
    images: list[ImageResult]
    nfe: int
    metrics: JobMetrics
    extra: dict[str, Any] = field(default_factory=dict)
    latents: list[str] = field(default_factory=list)  # an encoding's latent, base64 float32 LE (encode_latents)

    def to_payload(self) -> dict[str, Any]:
        """JSON for the RQ result: PNGs as base64."""
        payload = {
            "images": [
                {"index": im.index, "seed": im.seed, "png_base64": base64.b64encode(im.png).decode("ascii")}
                for im in self.images
            ],
            "nfe": self.nfe,
            "metrics": asdict(self.metrics),
        }
        if self.latents:
            payload["latents"] = list(self.latents)
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> JobResult:
        images = [
            ImageResult(int(im["index"]), int(im["seed"]), base64.b64decode(im["png_base64"]))
            for im in payload["images"]
        ]
        return cls(
            images=images,
            nfe=int(payload["nfe"]),
            metrics=JobMetrics(**payload["metrics"]),
            latents=[str(z) for z in payload.get("latents", [])],
        )
