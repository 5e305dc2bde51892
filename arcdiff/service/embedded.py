"""Embedded mode: the worker's engine in the API process, generations kept in memory.

Used when no Redis URL is set: one command gives a working service on a laptop. Models load in
a background thread after startup; /readyz says so until they are loaded. Each generation keeps
its events (queued, progress, previews, the end) in a bounded in-memory log that event streams read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from arcdiff.contract import EVENTS_MAXLEN, TERMINAL_EVENTS, GenerationSpec, JobResult
from arcdiff.model.catalog import ModelInfo
from arcdiff.service.backend import Event, Generation, NotReady, QueueFull
from arcdiff.service.idempotency import MemoryIdempotency
from arcdiff.service.metrics import QUEUE_DEPTH
from arcdiff.service.ratelimit import MemoryLimiter
from arcdiff.service.settings import Settings
from arcdiff.service.webhook_store import MemoryWebhookStore
from arcdiff.worker import metrics as worker_metrics
from arcdiff.worker.engine import Engine, GenerationCanceled

log = logging.getLogger("arcdiff.embedded")

MAX_KEPT = 10_000  # generations remembered at most (oldest done ones are forgotten first)


@dataclass
class _EventLog:
    """A generation's events, bounded, and the wake-up of their readers."""

    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENTS_MAXLEN))
    seq: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on each new event

    def add(self, event: str, data: dict) -> None:
        """Append an event and wake its readers (on the event loop's thread). At the end the
        previews go (they are most of the memory a kept generation would hold)."""
        if event in TERMINAL_EVENTS:
            self.events = deque((e for e in self.events if e.event != "preview"), maxlen=EVENTS_MAXLEN)
        self.seq += 1
        self.events.append(Event(str(self.seq), event, data))
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass
class _Entry:
    spec: GenerationSpec
    future: Future[JobResult]  # the engine's: resolves to the result, or raises why not
    log: _EventLog
    done_at: float | None = None


class EmbeddedBackend:
    mode = "embedded"

    def __init__(self, settings: Settings, models: dict[str, ModelInfo]):
        self.settings = settings
        self.models = models
        self.engine: Engine | None = None
        self._load_error: str | None = None
        self._loader: asyncio.Task | None = None
        self._gens: dict[str, _Entry] = {}  # insertion-ordered: oldest first
        self._loop: asyncio.AbstractEventLoop | None = None

    def rate_limiter(self, images_per_min: int) -> MemoryLimiter:
        return MemoryLimiter(images_per_min)

    def idempotency_store(self, ttl_s: int) -> MemoryIdempotency:
        return MemoryIdempotency(ttl_s)

    def webhook_store(self, ttl_s: int) -> MemoryWebhookStore:
        return MemoryWebhookStore(ttl_s)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        from arcdiff.worker.main import build_engine

        if not self.models:
            self._load_error = "no models to serve"
            return
        try:
            engine = await asyncio.to_thread(
                build_engine, self.settings, list(self.models), f"embedded@{socket.gethostname()}"
            )
        except Exception as e:
            log.exception("loading models failed")
            self._load_error = f"loading models failed: {e}"
            return
        self.engine = await asyncio.to_thread(engine.start)  # start() returns once warmed up

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)

    async def readiness(self) -> tuple[bool, str | None]:
        if self._load_error:
            return False, self._load_error
        if self.engine is None:
            return False, "loading models"
        if not self.engine.alive:
            return False, "engine stopped"
        if self.engine.failed_models:
            return False, "; ".join(f"model {n} failed to load: {why}" for n, why in self.engine.failed_models.items())
        return True, None

    async def submit(self, spec: GenerationSpec) -> None:
        ready, reason = await self.readiness()
        failed = self.engine.failed_models if self.engine is not None else {}
        if spec.model in failed:
            raise NotReady(f"model {spec.model} failed to load: {failed[spec.model]}", retry_after=60)
        if not ready and not failed:  # a model that failed to load does not stop the others
            raise NotReady(reason or "not ready", retry_after=2)
        self._forget_expired()
        if self._queued(spec.model) >= self.settings.queue_limit:
            raise QueueFull(f"{self.settings.queue_limit} generations already waiting for {spec.model}", retry_after=1)
        engine, loop, log = self.engine, self._loop, _EventLog()
        if engine is None or loop is None:  # ready means loaded, and loading starts in start()
            raise NotReady("loading models", retry_after=2)
        log.add("queued", {})

        def on_event(event: str, data: dict) -> None:  # engine threads: hand over to the loop
            loop.call_soon_threadsafe(log.add, event, data)

        def on_done(_f: Future) -> None:
            entry.done_at = time.time()
            loop.call_soon_threadsafe(lambda: log.add(self._status(entry)[0], {}))

        entry = _Entry(spec, engine.submit(spec, listener=on_event), log)
        self._gens[spec.id] = entry
        entry.future.add_done_callback(on_done)

    def _queued(self, model: str) -> int:
        engine = self.engine
        return len(
            [
                e
                for e in self._gens.values()
                if e.spec.model == model
                and not e.future.done()
                and engine is not None
                and engine.status(e.spec.id) == "queued"
            ]
        )

    def _forget_expired(self) -> None:
        now = time.time()
        expired = [gid for gid, e in self._gens.items() if e.done_at is not None and now - e.done_at > self._ttl(e)]
        for gid in expired:
            del self._gens[gid]
        while len(self._gens) >= MAX_KEPT:
            oldest = next((gid for gid, e in self._gens.items() if e.done_at is not None), None)
            if oldest is None:
                break
            del self._gens[oldest]

    def _ttl(self, e: _Entry) -> float:
        failed = e.future.exception() is not None if e.future.done() and not e.future.cancelled() else True
        return self.settings.failure_ttl_s if failed else self.settings.result_ttl_s

    def _status(self, e: _Entry) -> tuple[str, str | None]:
        """(status, error) of a generation whose future is done."""
        if e.future.cancelled():
            return "failed", "taken back by the engine"
        exc = e.future.exception()
        if isinstance(exc, GenerationCanceled):
            return "canceled", str(exc)
        if exc is not None:
            return "failed", str(exc)
        return "finished", None

    async def get(self, gen_id: str) -> Generation | None:
        e = self._gens.get(gen_id)
        if e is None:
            return None
        if e.future.done():
            status, error = self._status(e)
            return Generation(e.spec, status, result=e.future.result() if status == "finished" else None, error=error)
        live = self.engine.status(gen_id) if self.engine is not None else None
        return Generation(e.spec, live or "queued")

    async def cancel(self, gen_id: str) -> Generation | None:
        e = self._gens.get(gen_id)
        if e is None:
            return None
        if not e.future.done() and self.engine is not None:
            self.engine.cancel(gen_id)  # resolves the future now: the rows leave at the next tick
        return await self.get(gen_id)

    async def events(self, gen_id: str, after: str | None = None) -> AsyncIterator[Event]:
        last = int(after) if after and after.isdigit() else 0
        while (e := self._gens.get(gen_id)) is not None:
            changed = e.log.changed  # taken before reading: an event added meanwhile sets it
            for ev in list(e.log.events):
                if int(ev.id) > last:
                    last = int(ev.id)
                    yield ev
                    if ev.terminal:
                        return
            with contextlib.suppress(asyncio.TimeoutError):  # look again (it may have been forgotten)
                await asyncio.wait_for(changed.wait(), timeout=5.0)

    async def wait(self, gen_id: str, timeout: float) -> Generation | None:
        e = self._gens.get(gen_id)
        if e is None:
            return None
        if not e.future.done():
            # asyncio.wait never cancels what it waits on (wait_for would cancel the engine's future)
            await asyncio.wait({asyncio.wrap_future(e.future)}, timeout=timeout)
        return await self.get(gen_id)

    async def queue_depths(self) -> dict[str, int]:
        return {name: self._queued(name) for name in self.models}

    async def workers(self) -> dict[str, int]:
        serving = self.engine is not None and self.engine.alive
        failed = self.engine.failed_models if self.engine is not None else {}
        return {name: int(serving and name not in failed) for name in self.models}

    async def scrape(self) -> None:
        for model, depth in (await self.queue_depths()).items():
            QUEUE_DEPTH.labels(model).set(depth)
        if self.engine is not None:  # until it exists, its worker gauges read 0
            # the in-process engine is the deployment's one worker, and no RQ worker sets these
            worker_metrics.UP.set(1 if self.engine.alive else 0)
            worker_metrics.BUSY.set(1 if self.engine.held() else 0)
