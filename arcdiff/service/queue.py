"""The queue client: generations as RQ jobs (JSON serializer), two queues per model: interactive
(arcdiff:<model>) and batch (arcdiff:<model>:batch), which workers try in that order.

The API only enqueues and reads; `arcdiff worker` processes do the sampling. A job's status,
result and failure are RQ's own (what `rq info` shows). Waiting for a job blocks on its RQ
result stream (XREAD) instead of polling. A generation's events are a Redis stream of their own
(contract.events_key) that this API starts with "queued" and the worker continues; any API process
can read it. Cancel uses RQ's own means: Job.cancel for a queued job, the stop-job command for a
running one (the worker cancels it in its engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import cast

import redis
import redis.asyncio as aredis
from rq import Queue, Retry, Worker
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from arcdiff.contract import (
    PRIORITIES,
    TASK,
    GenerationSpec,
    JobResult,
    SpecError,
    add_event,
    events_key,
    queue_expiry,
    queue_name,
)
from arcdiff.model.catalog import ModelInfo
from arcdiff.service.backend import Event, Generation, NotReady, QueueFull
from arcdiff.service.idempotency import RedisIdempotency
from arcdiff.service.metrics import QUEUE_DEPTH
from arcdiff.service.ratelimit import RedisLimiter
from arcdiff.service.settings import ApiSettings
from arcdiff.service.webhook_store import RedisWebhookStore

log = logging.getLogger("arcdiff.queue")
# XREAD's answer (bytes, the client does not decode): [(stream key, [(entry id, {field: value})])]
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]

_STATUS = {
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled",  # the worker stopped it on a stop-job command (what DELETE sends)
    JobStatus.CANCELED: "canceled",
}
_NOT_STARTED = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED)
EVENT_POLL_MS = 2000  # an event stream with nothing new looks at the job's status this often


class RedisBackend:
    mode = "redis"

    def __init__(self, settings: ApiSettings, models: dict[str, ModelInfo]):
        if not settings.redis_url:
            raise ValueError("RedisBackend needs a Redis URL")
        self.settings = settings
        self.models = models
        # short socket timeouts: a request must fail fast (503) when Redis is gone, not hang
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        self.aredis = aredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
        self.queues = {  # by (model, priority)
            (name, priority): Queue(queue_name(name, priority), connection=self.redis, serializer=JSONSerializer)
            for name in models
            for priority in PRIORITIES
        }
        self._cached: tuple[float, str | None, dict[str, int]] = (float("-inf"), None, {})

    async def start(self) -> None:
        pass

    def rate_limiter(self, images_per_min: int) -> RedisLimiter:
        return RedisLimiter(images_per_min, self.redis)

    def idempotency_store(self, ttl_s: int) -> RedisIdempotency:
        return RedisIdempotency(self.aredis, ttl_s)

    def webhook_store(self, ttl_s: int) -> RedisWebhookStore:
        return RedisWebhookStore(self.aredis, ttl_s)

    async def close(self) -> None:
        await self.aredis.aclose()
        self.redis.close()

    # ---- readiness -----------------------------------------------------------------------------

    def _check(self) -> tuple[str | None, dict[str, int]]:
        """(a problem with Redis itself, live workers per model)."""
        try:
            self.redis.ping()
            # a worker listens on both queues of its models: count it on the interactive one
            counts = {
                name: len(Worker.all(queue=q))
                for (name, priority), q in self.queues.items()
                if priority == PRIORITIES[0]
            }
        except redis.RedisError as e:
            return f"Redis unreachable: {e}", {}
        return None, counts

    async def _state(self, fresh: bool = False) -> tuple[str | None, dict[str, int]]:
        checked_at, error, counts = self._cached
        if fresh or time.monotonic() - checked_at > self.settings.ready_cache_s:
            error, counts = await asyncio.to_thread(self._check)
            self._cached = (time.monotonic(), error, counts)
        return error, counts

    async def readiness(self) -> tuple[bool, str | None]:
        """Ready when Redis answers: the queue holds generations until a worker takes them, so
        workers may scale to zero. ARCDIFF_READY_REQUIRES_WORKERS also wants a worker per model."""
        if not self.models:
            return False, "no models to serve"
        error, counts = await self._state()
        if error:
            return False, error
        missing = sorted(name for name, n in counts.items() if not n)
        if missing and self.settings.ready_requires_workers:
            return False, f"no worker serving {', '.join(missing)} (ARCDIFF_READY_REQUIRES_WORKERS is set)"
        return True, None

    async def workers(self) -> dict[str, int]:
        error, counts = await self._state()
        if error:
            raise NotReady(error, retry_after=2)
        return counts

    # ---- generations ---------------------------------------------------------------------------

    async def submit(self, spec: GenerationSpec) -> None:
        error, counts = await self._state()
        strict = self.settings.ready_requires_workers
        if error or (strict and not counts.get(spec.model)):  # a cached "no": look again before refusing
            error, counts = await self._state(fresh=True)
        if error:
            raise NotReady(error, retry_after=2)
        if strict and not counts.get(spec.model):
            raise NotReady(f"no worker serving {spec.model} (ARCDIFF_READY_REQUIRES_WORKERS is set)", retry_after=2)
        await asyncio.to_thread(self._enqueue, spec)

    def _enqueue(self, spec: GenerationSpec) -> None:
        q = self.queues[(spec.model, spec.priority)]
        try:
            if q.count >= self.settings.queue_limit:
                raise QueueFull(
                    f"{self.settings.queue_limit} generations already waiting for {spec.model}", retry_after=1
                )
            with self.redis.pipeline(transaction=False) as pipe:
                add_event(pipe, spec.id, "queued", {}, self.settings.result_ttl_s)
                pipe.execute()
            q.enqueue_call(
                TASK,
                args=(spec.to_payload(),),
                timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.result_ttl_s,
                failure_ttl=self.settings.failure_ttl_s,
                job_id=spec.id,
                # a job abandoned by a dead worker (killed, host lost) is run again; failures the
                # engine reports (NaN, timeout, stop) are final: the worker zeroes the retries
                retry=Retry(max=self.settings.retries) if self.settings.retries else None,
                description=f"{spec.model} {spec.solver} steps={spec.steps} n={spec.n} seed={spec.seed}",
            )
        except redis.RedisError as e:
            raise NotReady(f"Redis error: {e}", retry_after=2) from None

    def _fetch(self, gen_id: str) -> Generation | None:
        try:
            job = Job.fetch(gen_id, connection=self.redis, serializer=JSONSerializer)
            if job.func_name != TASK:
                return None
            spec = GenerationSpec.from_payload(job.args[0])
        except (NoSuchJobError, SpecError, IndexError, TypeError, ValueError):
            return None
        status = _STATUS.get(job.get_status(refresh=False), "queued")
        expired = queue_expiry(spec, self.settings.queue_timeout_s, time.time()) if status == "queued" else None
        if expired:
            # no worker took it in time: it is failed whoever takes it later (the worker records it)
            return Generation(spec, "failed", error=expired)
        if status == "finished":
            value = job.return_value()
            if value is None:  # result expired between the two reads
                return None
            return Generation(spec, status, result=JobResult.from_payload(value))
        if status == "canceled":
            latest = job.latest_result()
            reason = latest.exc_string.strip() if latest is not None and latest.exc_string else "canceled on request"
            return Generation(spec, status, error=reason)
        if status == "failed":
            latest = job.latest_result()
            error = (
                latest.exc_string
                if latest is not None and latest.exc_string
                else f"job {job.get_status(refresh=False)}"
            )
            return Generation(spec, status, error=error.strip())
        return Generation(spec, status)

    async def get(self, gen_id: str) -> Generation | None:
        try:
            return await asyncio.to_thread(self._fetch, gen_id)
        except redis.RedisError as e:
            raise NotReady(f"Redis error: {e}", retry_after=2) from None

    async def wait(self, gen_id: str, timeout: float) -> Generation | None:
        gen = await self.get(gen_id)
        if gen is None or gen.done:
            return gen
        # RQ appends every result (success or failure) to a per-job stream: block on it. A broken
        # connection (Redis restarted since it was pooled) is retried until the timeout passes.
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if await self.aredis.xread({Result.get_key(gen_id): "0-0"}, block=max(1, int(left * 1000))):
                    break
            except redis.RedisError as e:
                log.warning("waiting for %s: %s", gen_id, e)
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return await self.get(gen_id)

    def _cancel(self, gen_id: str) -> Generation | None:
        gen = self._fetch(gen_id)
        if gen is None or gen.done:
            return gen
        job = Job.fetch(gen_id, connection=self.redis, serializer=JSONSerializer)
        if job.get_status(refresh=False) in _NOT_STARTED:
            with contextlib.suppress(InvalidJobOperation):  # canceled meanwhile
                job.cancel()  # out of the queue: it never runs
            with self.redis.pipeline(transaction=False) as pipe:
                add_event(pipe, gen_id, "canceled", {}, self.settings.result_ttl_s)
                pipe.execute()
            job = Job.fetch(gen_id, connection=self.redis, serializer=JSONSerializer)
        if job.worker_name:  # running, or taken by a worker just before the cancel
            with contextlib.suppress(InvalidJobOperation):
                send_stop_job_command(self.redis, gen_id, serializer=JSONSerializer)
        return self._fetch(gen_id)

    async def cancel(self, gen_id: str) -> Generation | None:
        try:
            gen = await asyncio.to_thread(self._cancel, gen_id)
        except redis.RedisError as e:
            raise NotReady(f"Redis error: {e}", retry_after=2) from None
        if gen is not None and not gen.done:  # the worker cancels it at its next tick
            gen = await self.wait(gen_id, 10.0)
        return gen

    async def events(self, gen_id: str, after: str | None = None) -> AsyncIterator[Event]:
        key, last, block = events_key(gen_id), after or "0-0", None  # the first read does not block
        while True:
            answer: StreamReply | None
            try:
                # RESP2 and undecoded bytes (from_url above): the list form of redis-py's union
                answer = cast(StreamReply, await self.aredis.xread({key: last}, count=256, block=block))
            except redis.RedisError as e:
                log.warning("reading the events of %s: %s", gen_id, e)
                answer = None
                await asyncio.sleep(0.5)
            block = EVENT_POLL_MS
            if answer:
                for _key, entries in answer:
                    for entry_id, fields in entries:
                        last = entry_id.decode()
                        ev = Event(last, fields[b"event"].decode(), json.loads(fields[b"data"]))
                        yield ev
                        if ev.terminal:
                            return
                continue
            # nothing new: the job itself says whether it ended without a marker (expired in the
            # queue, or its worker died and the marker never came)
            gen = await self.get(gen_id)
            if gen is None:
                return
            if gen.done:
                yield Event(last, gen.status)
                return

    async def queue_depths(self) -> dict[str, int]:
        def depths() -> dict[str, int]:
            with self.redis.pipeline(transaction=False) as pipe:
                for q in self.queues.values():
                    pipe.llen(q.key)
                out = dict.fromkeys(self.models, 0)
                for (name, _priority), n in zip(self.queues, pipe.execute(), strict=True):
                    out[name] += n
                return out

        try:
            return await asyncio.to_thread(depths)
        except redis.RedisError:
            return {}

    async def scrape(self) -> None:
        for model, depth in (await self.queue_depths()).items():
            QUEUE_DEPTH.labels(model).set(depth)
