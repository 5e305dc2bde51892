"""What travels between the API and the workers: the generation spec, its queue, and its result.

Everything here is plain JSON (RQ's JSON serializer; never pickle, since Redis may be reachable
by others). A worker re-checks every spec it dequeues: a malformed job fails with the reason
instead of reaching the engine. No torch imports: the API uses this module too.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

from arcdiff.model.solver_names import GRIDS, SOLVERS

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

    def to_payload(self) -> dict[str, Any]:
        """JSON for the RQ result: PNGs as base64."""
        return {
            "images": [
                {"index": im.index, "seed": im.seed, "png_base64": base64.b64encode(im.png).decode("ascii")}
                for im in self.images
            ],
            "nfe": self.nfe,
            "metrics": asdict(self.metrics),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> JobResult:
        images = [
            ImageResult(int(im["index"]), int(im["seed"]), base64.b64decode(im["png_base64"]))
            for im in payload["images"]
        ]
        return cls(images=images, nfe=int(payload["nfe"]), metrics=JobMetrics(**payload["metrics"]))
