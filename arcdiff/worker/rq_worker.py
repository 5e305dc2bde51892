"""The RQ worker around the engine: many jobs held at once, each with an honest RQ lifecycle.

RQ's own loop is kept (registration, dequeue, maintenance, heartbeats, death). The hook that
changes is `execute_job`: like SimpleWorker it runs in this process (CUDA does not survive fork),
but instead of performing the job it marks it started (an RQ execution in the StartedJobRegistry)
and hands it to the engine, then returns at once so the loop can take the next job while earlier
ones still sample. A lifecycle thread finishes each job in RQ when the engine resolves it
(finished with its result, or failed with the reason) and sends heartbeats for every job held.

Each held job's events (progress, previews) go to its Redis stream (contract.events_key) from one
publisher thread, in order, followed by a terminal marker once RQ has recorded the end; the API
serves them as server-sent events. A stop-job command (what DELETE /v1/generations/{id} sends for
a running generation) cancels it in the engine: its rows leave the batch at the next tick and RQ
records it STOPPED.

Each model has two queues, interactive (arcdiff:<model>) and batch (arcdiff:<model>:batch); the
worker tries every interactive queue before any batch one. Dequeueing waits for room in the
model's batch first, so jobs stay in Redis, visible as queued and free for other workers, until this
one can run them; an interactive job has room while interactive images fill less than a batch
(the engine pauses batch rows for it), a batch job while all images do (Engine.has_room).
Blocking pops are short (1 s) so a stop request is seen promptly without raising out of a Redis
call. RQ's `max_idle_time` holds: a worker idle that long leaves the loop.

What this needs of RQ beyond its public API goes through arcdiff/worker/rq_compat.py.

Ways out of the loop, each logged: SIGTERM/SIGINT (warm: stop taking jobs, requeue the ones not
started, let the running ones finish for up to drain_timeout_s, requeue the rest), a second
signal (cold: requeue everything now), a Redis timeout or an unhandled error (RQ's loop logs it;
teardown requeues what is held). Nothing is left in the started state.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue
from rq.command import parse_payload
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, WorkerStatus

from arcdiff.contract import PRIORITIES, TASK, GenerationSpec, SpecError, add_event, queue_model, queue_name
from arcdiff.worker import metrics as m
from arcdiff.worker import rq_compat as rq_internal
from arcdiff.worker.engine import Engine, GenerationCanceled

log = logging.getLogger("arcdiff.worker")


@contextlib.contextmanager
def _outage_passes(worker: str) -> Iterator[None]:
    """Let a lost Redis connection pass (logged), for the worker's dequeue to wait out."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        log.warning("worker %s: Redis unreachable (%s); the dequeue waits for it", worker, e)


POLL_S = 1  # seconds a blocking pop (or a wait for room) lasts before the loop looks again


@dataclass
class _Held:
    job: Job
    queue: Queue
    execution: Execution
    spec: GenerationSpec | None
    future: Future | None = None


class BatchingWorker(SimpleWorker):
    """An in-process RQ worker whose jobs share the engine's continuously refilled batch."""

    def __init__(
        self,
        engine: Engine,
        drain_timeout_s: float = 25.0,
        heartbeat_s: float = 10.0,
        events_ttl_s: int = 3600,
        **kwargs: Any,
    ):
        self._held: dict[str, _Held] = {}  # before RQ's __init__, which may already set the state
        self._held_lock = threading.Lock()
        kwargs.setdefault("serializer", JSONSerializer)
        # every interactive queue before any batch queue: RQ tries them in this order
        queues = [queue_name(model, priority) for priority in PRIORITIES for model in engine.models]
        # RQ computes Redis TTLs from job_monitoring_interval (+ 60, for EXPIRE, which wants whole
        # seconds; one of its paths passes it unrounded): it gets whole seconds, and our heartbeats
        # keep the exact (possibly fractional) interval
        self.heartbeat_s = heartbeat_s
        super().__init__(queues, job_monitoring_interval=math.ceil(heartbeat_s), **kwargs)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self._done: queue_mod.Queue[str | None] = queue_mod.Queue()
        self._lifecycle_stop = threading.Event()
        self._lifecycle = threading.Thread(target=self._lifecycle_loop, name="arcdiff-rq-lifecycle", daemon=True)
        self.events_ttl_s = events_ttl_s
        self._events: queue_mod.Queue[tuple[str, str, dict] | None] = queue_mod.Queue()
        self._publisher = threading.Thread(target=self._publish_loop, name="arcdiff-rq-events", daemon=True)
        self._cold = False
        self._in_teardown = False
        self._stop_ids: set[str] = set()  # jobs stopped on request (rq's stop-job command)
        self._stop_signal_at: float | None = None  # time.monotonic() of the first SIGTERM/SIGINT

    # ---- RQ hooks ----------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long a held job's started entry lives without a heartbeat. We heartbeat while jobs
        run (SimpleWorker cannot, hence its timeout + 60), so a dead worker's jobs are found
        abandoned, and retried, after a few missed beats; the engine enforces job timeouts."""
        return int(3 * self.heartbeat_s) + 10

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        self._lifecycle.start()
        self._publisher.start()
        m.UP.set(1)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Mark the job started in RQ and hand it to the engine; returns without waiting."""
        unreadable = None
        try:
            job.func_name, job.args, job.kwargs  # noqa: B018 (decode now: RQ's own bookkeeping reads them)
        except Exception as e:  # not JSON (e.g. a pickled job pushed by someone with Redis access)
            unreadable = f"cannot read the job's data ({type(e).__name__}); jobs must be JSON"
            job.func_name, job.instance, job.args, job.kwargs = "<unreadable>", None, (), {}
        execution = self.prepare_execution(job)
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        held = _Held(job, queue, execution, None)
        if job.id in CanceledJobRegistry(queue.name, connection=self.connection, serializer=self.serializer):
            # canceled (Job.cancel) between the pop and here: it never runs
            log.info("worker %s: job %s was canceled before it started", self.name, job.id)
            with self.connection.pipeline() as pipe:
                pipe.multi()
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                job.set_status(JobStatus.CANCELED, pipeline=pipe)
                pipe.execute()
            return
        try:
            if unreadable:
                raise SpecError(unreadable)
            held.spec = self._spec_of(job, queue)
        except SpecError as e:
            self._fail(held, f"invalid generation job: {e}")
            m.JOBS.labels(queue_model(queue.name)[0], "failed").inc()
            return
        with self._held_lock:
            self._held[job.id] = held
        self._update_state()
        try:
            held.future = self.engine.submit(
                held.spec,
                timeout_s=job.timeout if job.timeout and job.timeout > 0 else None,
                listener=functools.partial(self._on_event, job.id),
            )
        except Exception:
            log.exception("worker %s: engine refused job %s; requeueing it", self.name, job.id)
            with self._held_lock:
                self._held.pop(job.id, None)
            self._requeue_one(held)
            rq_internal.request_stop(self)  # an engine that refuses work cannot serve this queue
            return
        held.future.add_done_callback(lambda _f: self._done.put(job.id))

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """Wait for batch room, then pop a job from the queues of the models that have room.

        Returns None (which ends RQ's loop) once a stop was requested, or after `max_idle_time`
        seconds without a job."""
        backoff = 1.0
        by_queue = {q.name: queue_model(q.name) for q in self.queues}
        idle_since = time.monotonic()
        while True:
            if rq_internal.stop_requested(self):
                return None
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                log.info("worker %s: idle for %d s: leaving the loop", self.name, max_idle_time)
                return None
            try:
                self.heartbeat()
                self._ensure_registered()
                self._update_state()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                ready = set(self.engine.wait_for_room(by_queue.values(), timeout=POLL_S))
                if rq_internal.stop_requested(self):
                    return None
                if not ready:
                    continue
                queues = [q for q in rq_internal.ordered_queues(self) if by_queue[q.name] in ready]
                result = self.queue_class.dequeue_any(
                    queues,
                    POLL_S,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
            except DequeueTimeout:
                continue
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                log.error("worker %s: Redis unreachable (%s), retrying in %.0f s", self.name, e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_connection_wait_time)
                continue
            if result is not None:
                job, queue = result
                self.reorder_queues(reference_queue=queue)
                log.info("worker %s: %s: took job %s", self.name, queue.name, job.id)
                return job, queue

    # RQ's loop quits on any error outside its dequeue, and a Redis restart that lands while it
    # checks for suspension, runs maintenance or beats the heart would end the worker. Those steps
    # let the outage pass: the dequeue above meets it next and waits it out with backoff.
    def check_for_suspension(self, burst: bool) -> None:
        with _outage_passes(self.name):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        with _outage_passes(self.name):
            super().run_maintenance_tasks()

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        with _outage_passes(self.name):
            super().heartbeat(timeout, pipeline)

    def _ensure_registered(self) -> None:
        """Register again if Redis lost this worker (restarted without persistence, or flushed):
        otherwise the API would see no worker for these models and answer 503 forever."""
        if rq_internal.is_registered(self):
            return
        log.warning("worker %s: not registered in Redis any more (Redis restarted?): registering again", self.name)
        self.connection.delete(self.key)
        self.register_birth()
        self._update_state(force=True)  # the new registration has no state yet

    def request_stop(self, signum: int, frame: Any) -> None:
        """First SIGTERM/SIGINT: stop taking jobs, drain (see teardown). Only sets flags: a signal
        handler must not raise out of a Redis call halfway through."""
        log.warning(
            "worker %s: got %s: stop taking jobs, drain the %d held",
            self.name,
            rq_internal.signal_name(signum),
            len(self._held),
        )
        self._stop_signal_at = time.monotonic()
        rq_internal.request_stop(self)
        signal.signal(signal.SIGINT, self._request_cold_stop)
        signal.signal(signal.SIGTERM, self._request_cold_stop)

    def _request_cold_stop(self, signum: int, frame: Any) -> None:
        if self._stop_signal_at is not None and time.monotonic() - self._stop_signal_at < 1:
            return  # the same stop delivered twice (process group and pool)
        log.warning("worker %s: got %s again: requeue everything held now", self.name, rq_internal.signal_name(signum))
        self._cold = True
        rq_internal.request_stop(self)

    def handle_payload(self, message: Any) -> None:
        """RQ's pubsub commands. stop-job / stop-execution name one of the many jobs held here
        (RQ's own handlers assume one current job)."""
        payload = parse_payload(message)
        if payload.get("command") in ("stop-job", "stop-execution"):
            self._stop_job(str(payload.get("job_id") or ""))
        else:
            super().handle_payload(message)

    def _stop_job(self, job_id: str) -> None:
        with self._held_lock:
            held = job_id in self._held
        if not held:
            log.warning("worker %s: not holding job %s, stop command ignored", self.name, job_id)
            return
        log.info("worker %s: canceling job %s on request", self.name, job_id)
        self._stop_ids.add(job_id)
        self.engine.cancel(job_id)

    def teardown(self) -> None:
        """Every way out of the loop ends here: give back or finish every held job, then die."""
        self._in_teardown = True
        try:
            self._drain()
        except Exception:
            log.exception("worker %s: drain failed", self.name)
        finally:
            m.UP.set(0)
            m.BUSY.set(0)
            super().teardown()
            log.info("worker %s: stopped", self.name)

    def unsubscribe(self) -> None:
        rq_internal.stop_command_thread(self)  # else RQ's close can wait up to 60 s for it
        super().unsubscribe()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        # RQ's loop says "idle" whenever it dequeues; we are busy while holding jobs
        if state == WorkerStatus.IDLE and self._held:
            state = WorkerStatus.BUSY
        super().set_state(state, pipeline=pipeline)

    # ---- drain -------------------------------------------------------------------------------

    def _drain(self) -> None:
        with self._held_lock:
            held = len(self._held)
        log.info("worker %s: draining %d job(s)", self.name, held)
        self._requeue(self.engine.take_unstarted(), "not started before shutdown")
        deadline = time.monotonic() + (0 if self._cold else self.drain_timeout_s)
        while not self._cold and time.monotonic() < deadline:
            if self.engine.wait_idle(timeout=0.2):
                break
        self._requeue(self.engine.take_all(), "still running at shutdown")
        # the lifecycle thread finishes what the engine resolved, then stops
        self._lifecycle_stop.set()
        self._done.put(None)
        if self._lifecycle.is_alive():
            self._lifecycle.join(timeout=30)
        with self._held_lock:
            left = list(self._held.values())
            self._held.clear()
        for h in left:  # resolved but never recorded (lifecycle thread stuck): do not leave it started
            self._requeue_one(h)
        self._events.put(None)  # the publisher sends what is queued, then stops
        if self._publisher.is_alive():
            self._publisher.join(timeout=10)
        log.info("worker %s: drained", self.name)

    def _requeue(self, specs: list[GenerationSpec], why: str) -> None:
        for spec in reversed(specs):  # each goes to the front: last first keeps their order
            with self._held_lock:
                h = self._held.pop(spec.id, None)
            if h is not None:
                log.info("worker %s: requeueing %s (%s)", self.name, spec.id, why)
                self._requeue_one(h)
        self._update_state()

    def _requeue_one(self, h: _Held) -> None:
        """Back to the front of its queue, out of the StartedJobRegistry."""
        try:
            with self.connection.pipeline() as pipe:
                pipe.multi()  # one transaction: out of the started registry and back on the queue
                self.cleanup_execution(h.job, pipeline=pipe, execution=h.execution)
                h.job.started_at = None
                h.job.worker_name = None
                h.queue.enqueue_job(h.job, pipeline=pipe, at_front=True)
                pipe.execute()
            self._events.put((h.job.id, "queued", {}))
        except Exception:
            log.exception("worker %s: could not requeue %s", self.name, h.job.id)

    # ---- lifecycle thread ----------------------------------------------------------------------

    def _lifecycle_loop(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_s
        while True:
            try:
                job_id = self._done.get(timeout=max(0.05, next_beat - time.monotonic()))
            except queue_mod.Empty:
                job_id = None
            if job_id is not None:
                self._record(job_id)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_s
                self._heartbeat_held()
            if self._lifecycle_stop.is_set() and self._done.empty():
                with self._held_lock:
                    if not self._held:
                        return
                time.sleep(0.05)

    def _record(self, job_id: str) -> None:
        """The engine resolved a job: record it in RQ as finished or failed."""
        with self._held_lock:
            h = self._held.get(job_id)
            if h is None or h.future is None or h.future.cancelled():
                return  # taken back for requeueing: the drain records it
            del self._held[job_id]
        exc = h.future.exception()
        try:
            if exc is None:
                rq_internal.finish_job(self, h.job, h.queue, h.execution, h.future.result().to_payload())
            else:
                if isinstance(exc, GenerationCanceled):
                    self._stop_ids.add(job_id)
                self._fail(h, str(exc))
        except Exception:
            log.exception("worker %s: could not record the end of job %s", self.name, job_id)
        # after RQ has it: a reader that sees the marker reads the final status
        status = "finished" if exc is None else "canceled" if isinstance(exc, GenerationCanceled) else "failed"
        self._events.put((job_id, status, {}))
        self._update_state()

    def _fail(self, h: _Held, reason: str) -> None:
        if h.job.id in self._stop_ids:
            self._stop_ids.discard(h.job.id)
            rq_internal.mark_stopped_on_request(self, h.job.id)  # RQ then records it as stopped, not failed
        rq_internal.mark_failed(h.job)
        h.job.retries_left = 0  # the engine's verdict is final; retries are for abandoned jobs
        self.handle_execution_ended(h.job, h.queue, h.job.failure_callback_timeout)
        self.handle_job_failure(h.job, h.queue, exc_string=reason, execution=h.execution)
        log.warning("worker %s: job %s failed: %s", self.name, h.job.id, reason)

    def _on_event(self, job_id: str, event: str, data: dict) -> None:
        """The engine's listener for a held job: queue the event for the publisher (no I/O here)."""
        self._events.put((job_id, event, data))

    def _publish_loop(self) -> None:
        """Send the held jobs' events to their Redis streams, in order, a batch per round trip.
        Events are advisory (the job's status in RQ is the truth): a Redis error drops them."""
        while True:
            batch = [self._events.get()]
            while len(batch) < 256:
                try:
                    batch.append(self._events.get_nowait())
                except queue_mod.Empty:
                    break
            items = [b for b in batch if b is not None]
            if items:
                try:
                    with self.connection.pipeline(transaction=False) as pipe:
                        for job_id, event, data in items:
                            add_event(pipe, job_id, event, data, self.events_ttl_s)
                        pipe.execute()
                except redis.exceptions.RedisError as e:
                    log.warning("worker %s: could not publish %d event(s): %s", self.name, len(items), e)
            if len(items) < len(batch):
                return

    def _heartbeat_held(self) -> None:
        with self._held_lock:
            held = list(self._held.values())
        for h in held:
            try:
                self.maintain_heartbeats(h.job, h.execution)
            except Exception:
                log.exception("worker %s: heartbeat for %s failed", self.name, h.job.id)

    # ---- helpers -------------------------------------------------------------------------------

    def _spec_of(self, job: Job, queue: Queue) -> GenerationSpec:
        try:
            func, args, kwargs = job.func_name, job.args, job.kwargs
        except Exception as e:  # undecodable payload
            raise SpecError(f"cannot read the job's data ({e})") from None
        if func != TASK:
            raise SpecError(f"expected function {TASK}, got {func!r}")
        if len(args) != 1 or kwargs:
            raise SpecError("expected one argument, the generation spec")
        spec = GenerationSpec.from_payload(args[0])
        if spec.id != job.id:
            raise SpecError(f"spec id {spec.id!r} is not the job id {job.id!r}")
        if queue_name(spec.model, spec.priority) != queue.name:
            raise SpecError(f"a {spec.priority} generation of {spec.model!r} does not belong on queue {queue.name!r}")
        return spec

    def _update_state(self, force: bool = False) -> None:
        busy = bool(self._held)
        m.BUSY.set(1 if busy else 0)
        wanted = WorkerStatus.BUSY if busy else WorkerStatus.IDLE
        if (force or self.get_state() != wanted) and not self._in_teardown:
            with contextlib.suppress(redis.exceptions.RedisError):
                self.set_state(wanted)
