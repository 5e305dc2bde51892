"""Embedded mode: the worker's engine in the API process, generations kept in memory.

Used when no Redis URL is set: one command gives a working service on a laptop. Models load in
a background thread after startup; /readyz says so until they are loaded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass

from arcdiff.contract import GenerationSpec
from arcdiff.model.registry import ModelInfo
from arcdiff.service.backend import Generation, NotReady, QueueFull
from arcdiff.service.metrics import QUEUE_DEPTH
from arcdiff.service.settings import Settings
from arcdiff.worker.engine import Engine

log = logging.getLogger("arcdiff.embedded")

MAX_KEPT = 10_000  # generations remembered at most (oldest done ones are forgotten first)


@dataclass
class _Entry:
    spec: GenerationSpec
    future: Future
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

    async def start(self) -> None:
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
        fut = self.engine.submit(spec)
        entry = _Entry(spec, fut)
        fut.add_done_callback(lambda _f: setattr(entry, "done_at", time.time()))
        self._gens[spec.id] = entry

    def _queued(self, model: str) -> int:
        engine = self.engine
        return sum(
            1
            for e in self._gens.values()
            if e.spec.model == model
            and not e.future.done()
            and engine is not None
            and engine.status(e.spec.id) == "queued"
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

    async def get(self, gen_id: str) -> Generation | None:
        e = self._gens.get(gen_id)
        if e is None:
            return None
        if e.future.done():
            if e.future.cancelled():
                return Generation(e.spec, "failed", error="cancelled")
            exc = e.future.exception()
            if exc is not None:
                return Generation(e.spec, "failed", error=str(exc))
            return Generation(e.spec, "finished", result=e.future.result())
        status = self.engine.status(gen_id) if self.engine is not None else None
        return Generation(e.spec, status or "queued")

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
            self.engine.report_as_worker()
