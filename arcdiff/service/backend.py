"""What the routes need from wherever generations run: the embedded engine or Redis/RQ workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from arcdiff.contract import TERMINAL_EVENTS, GenerationSpec, JobResult
from arcdiff.model.catalog import ModelInfo

if TYPE_CHECKING:
    from arcdiff.service.idempotency import IdempotencyStore
    from arcdiff.service.webhook_store import WebhookStore


class Rejected(Exception):
    """A generation not accepted now; `reason` is the metric label, `retry_after` seconds."""

    status_code = 503
    reason = "not_ready"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Rejected):
    status_code = 429
    reason = "queue_full"


class NotReady(Rejected):
    status_code = 503
    reason = "not_ready"


@dataclass
class Generation:
    spec: GenerationSpec
    status: str  # queued | running | finished | failed | canceled
    result: JobResult | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_EVENTS


@dataclass
class Event:
    """One event of a generation: `id` orders them (what a client sends back as Last-Event-ID)."""

    id: str
    event: str  # queued | progress | preview | finished | failed | canceled
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


class Limiter(Protocol):
    """A per-caller images-per-minute limit (service.ratelimit), kept where the backend keeps state."""

    async def take(self, caller: str, n: int) -> None:
        """Count n images for caller, or raise ratelimit.RateLimited (nothing counted)."""

    async def give_back(self, caller: str, n: int) -> None:
        """Uncount n images taken for a generation that was then refused."""


class Backend(Protocol):
    mode: str  # "embedded" or "redis"
    models: dict[str, ModelInfo]  # the models served

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, spec: GenerationSpec) -> None:
        """Accept a generation or raise Rejected (QueueFull, NotReady)."""

    async def get(self, gen_id: str) -> Generation | None: ...

    async def wait(self, gen_id: str, timeout: float) -> Generation | None:
        """The generation once done, or as it is after `timeout` seconds."""

    async def cancel(self, gen_id: str) -> Generation | None:
        """Cancel a queued or running generation (no-op for one already done); returns it as it is
        then (None: unknown). A running one's images leave the batch at the next evaluation."""

    def events(self, gen_id: str, after: str | None = None) -> AsyncIterator[Event]:
        """The generation's events after the one with id `after` (from the start: None), as they
        come, ending with a terminal one (finished, failed, canceled); whoever serves them sends
        the generation itself as the terminal event's data."""

    async def queue_depths(self) -> dict[str, int]:
        """Generations accepted and not yet started, per model."""

    async def scrape(self) -> None:
        """Refresh the gauges that are read rather than counted, before /metrics renders."""

    async def readiness(self) -> tuple[bool, str | None]:
        """(ready, reason when not)."""

    async def workers(self) -> dict[str, int]:
        """Live workers per served model (embedded: 1 while the in-process engine serves it)."""

    def rate_limiter(self, images_per_min: int) -> Limiter:
        """The per-caller limit, shared by every API process where the backend is (Redis: a counter
        there; embedded: in this process's memory)."""

    def idempotency_store(self, ttl_s: int) -> IdempotencyStore:
        """Idempotency-Key claims, kept where the backend keeps state (Redis, or this process's memory)."""

    def webhook_store(self, ttl_s: int) -> WebhookStore:
        """Webhook configs, deliveries and their schedules, kept where the backend keeps state."""
