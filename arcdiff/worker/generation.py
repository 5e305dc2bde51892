"""One generation as the engine holds it: its future, its progress and events, and how it resolves.

The engine decides when a generation closes (under its lock, exactly once); what closing does to
the generation itself (the status counted, the log line, the future set) is here, as is the
emission of its events, so that the device loop only records facts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from arcdiff.contract import EditInputs, GenerationSpec, JobResult, queue_expiry, spec_nfe
from arcdiff.model.rng import image_seed
from arcdiff.worker import metrics as m
from arcdiff.worker.results import Collected

log = logging.getLogger("arcdiff.engine")


class GenerationFailed(Exception):
    """A generation the engine could not finish; str() is the reason shown to the client."""


class GenerationCanceled(GenerationFailed):
    """A generation canceled on request (Engine.cancel)."""


# called with (event, data) as a generation runs: "progress" {"nfe_done", "nfe_total", "images_done"}
# from the device thread, "preview" {"index", "nfe_done", "png_base64"} from an encode thread; it
# must only hand the event on (no I/O): it runs inside the tick
Listener = Callable[[str, dict], None]


@dataclass(eq=False)
class Generation:
    """One generation held by the engine (the scheduler sees its spec)."""

    spec: GenerationSpec
    future: Future
    deadline: float | None  # time.monotonic() after which it fails
    timeout_s: float | None
    state: str = "queued"  # queued (no image admitted yet) -> running; closed once resolved
    closed: bool = False
    admitted: int = 0  # images admitted to the batch so far
    in_batch: int = 0  # images in the batch now
    out: Collected = field(default_factory=Collected)
    listener: Listener | None = None
    nfe_done: int = 0  # network evaluations done, all images together
    images_done: int = 0  # images that left the batch finished
    reported_images: int = -1  # images_done at the last progress event
    next_progress: float = 0.0  # time.monotonic() of the next progress event due
    next_preview: float = 0.0
    inputs: EditInputs | None = None  # an edit's, encoding's or interpolation's decoded inputs

    @property
    def nfe_per_image(self) -> int:
        return spec_nfe(self.spec)

    def admit(self, now: float) -> None:
        """One of its images entered the batch (now: time.time())."""
        self.admitted += 1
        self.in_batch += 1
        if self.state == "queued":
            self.state = "running"
            self.out.first_admit = now
            m.QUEUE_WAIT.labels(self.spec.model).observe(max(0.0, now - self.spec.submitted_at))

    def image_done(self, k: int, now: float, sample: torch.Tensor | None = None) -> None:
        """Image k left the batch finished (now: time.time()); `sample`: its float result, to keep."""
        self.out.last_leave = now
        self.images_done += 1
        if sample is not None:
            self.out.samples[k] = sample
        m.IMAGES.labels(self.spec.model, self.spec.solver).inc()

    def non_finite(self, k: int) -> str:
        """The reason it fails when image k ends non-finite."""
        return f"image {k} (seed {image_seed(self.spec.seed, k)}) became non-finite (NaN or inf) during sampling"

    def overdue(self, now: float, wall: float, queue_timeout_s: float | None) -> str | None:
        """Why it must fail now, if it must: past its deadline (now: time.monotonic()), or still
        queued past the queue timeout (wall: time.time())."""
        if self.deadline is not None and now > self.deadline:
            return f"timed out after {self.timeout_s:g} s"
        return queue_expiry(self.spec, queue_timeout_s, wall) if self.state == "queued" else None

    def emit(self, event: str, data: dict) -> None:
        if self.listener is None or self.closed:
            return
        try:
            self.listener(event, data)
        except Exception:  # a broken listener must not break the batch
            log.exception("event listener of %s failed", self.spec.id)

    def report(self, now: float, interval_s: float) -> None:
        """A progress event now; the next one is due `interval_s` later."""
        self.next_progress = now + interval_s
        self.reported_images = self.images_done
        total = self.nfe_per_image * self.spec.n
        self.emit("progress", {"nfe_done": self.nfe_done, "nfe_total": total, "images_done": self.images_done})

    def resolve(
        self, result: JobResult | None = None, error: str | None = None, cancel: bool = False, canceled: bool = False
    ) -> None:
        """Settle the future of a generation the engine has just closed: with `result`, or failed
        with `error` (GenerationCanceled when `canceled`), or cancelled (`cancel`: given back to
        be requeued)."""
        status = "finished" if result is not None else "requeued" if cancel else "canceled" if canceled else "failed"
        m.JOBS.labels(self.spec.model, status).inc()
        if cancel:
            self.future.cancel()
            return
        if error is not None:
            level = logging.INFO if canceled else logging.WARNING
            log.log(level, "generation %s %s: %s", self.spec.id, "canceled" if canceled else "failed", error)
        try:
            if error is not None:
                self.future.set_exception((GenerationCanceled if canceled else GenerationFailed)(error))
            else:
                self.future.set_result(result)
        except InvalidStateError:  # a caller cancelled its future: nobody is waiting for it
            pass
