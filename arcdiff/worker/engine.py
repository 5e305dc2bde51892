"""The continuous-batching engine: one running batch per model that images join and leave at every
network evaluation ("tick"). This module carries out what the scheduler (scheduler.py: admission,
priorities, the tick budget, per-client caps, pausing) plans, as vLLM's model runner does.

Each tick, for each model with work:
1. the plan: the images admitted now (each joins its (solver, priority) group with its own
   generator seeded from (request seed, image index), its own step grid and a fresh solver state)
   and the rows of each group that run (paused rows keep state, step and noise stream untouched);
2. gather the rows' next points (x, eta) into one tensor, padded to the plan's size;
3. one forward -> (x0_hat, eps_hat), timed for the scheduler (timing.py; no sync on a GPU);
4. scatter back: each group advances its rows in one vectorised call; finished rows leave (known
   on the host: no device sync per tick), become pixels in one op and PNGs on a thread pool
   (encoding.py); a generation completes when all its images are encoded. A row that ends
   non-finite fails its generation, not the batch: rows never mix in the network (group norm and
   attention are per image), so one NaN image cannot spoil another.

One device thread runs the ticks (round robin over models); callers talk to it through a lock
(which also guards the schedulers) and get a concurrent.futures.Future per generation
(generation.py). Nothing here knows about HTTP or Redis.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import Future

import torch

from arcdiff.contract import LATENT_RANGE, GenerationSpec, JobResult, SpecError, decode_inputs, queue_expiry
from arcdiff.model.format import LoadedModel
from arcdiff.model.images import to_uint8
from arcdiff.worker import metrics as m
from arcdiff.worker.batch import RunningBatch
from arcdiff.worker.config import EngineConfig
from arcdiff.worker.device_thread import DeviceThread
from arcdiff.worker.encoding import Encoder
from arcdiff.worker.generation import Generation, GenerationCanceled, GenerationFailed, Listener
from arcdiff.worker.loading import Forward, Prepared, WarmUpFailed, warm_up
from arcdiff.worker.results import job_result
from arcdiff.worker.scheduler import GroupKey, Occupancy, Scheduler, TickPlan
from arcdiff.worker.timing import ForwardClock

__all__ = ["Engine", "EngineConfig", "GenerationCanceled", "GenerationFailed", "Listener"]

log = logging.getLogger("arcdiff.engine")


class _Runner:
    """The batch of one model: its scheduler (the policy), its running rows and its network."""

    def __init__(self, name: str, prepared: Prepared, config: EngineConfig, device: torch.device):
        self.name = name
        self.prepared = prepared
        self.forward: Forward = prepared.forward
        self.data_range = prepared.loaded.config.get("data_range", [-1.0, 1.0])
        self.sched: Scheduler[Generation] = Scheduler(config.scheduling)  # read and changed under the lock
        self.batch = RunningBatch(prepared.loaded.image_shape, device, self.data_range)  # the device thread's alone
        self.active: dict[str, Generation] = {}  # generations with rows in the batch, by id
        self.dirty = False  # a generation with rows in the batch was closed: drop its rows
        self.clock = ForwardClock(device)


class Engine:
    """Runs generations for a set of loaded models on one device with continuous batching."""

    def __init__(
        self,
        models: Mapping[str, Prepared | LoadedModel],
        config: EngineConfig | None = None,
        *,
        failed_models: Mapping[str, str] | None = None,
        device_thread: DeviceThread | None = None,
    ):
        """`models`: what to serve, by name; a LoadedModel runs its own denoiser eagerly, a Prepared
        its (compiled) forward with its eager fallback for the warm-up.
        `failed_models`: models that failed to load (name -> why), reported beside those that fail
        to warm up.
        `device_thread`: the thread to run the ticks on; pass the one that loaded the models (see
        arcdiff/worker/device_thread.py for why one thread should do all torch work). Default: a new one.
        Either way the engine owns it from then on and stops it in close()."""
        self.config = config = config or EngineConfig()
        self.device = torch.device(config.device)
        self.max_batch = config.max_batch
        self.buckets = config.bucket_sizes
        self.worker = config.worker
        self.failed_models = dict(failed_models or {})  # models not served: name -> why
        self._runners = {name: _Runner(name, Prepared.of(p), config, self.device) for name, p in models.items()}
        for name in self._runners:
            m.init_model_series(name)
        self._tasks: dict[str, Generation] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._encoder = Encoder(config.encode_threads, self._encoded, lambda task, why: self._close(task, error=why))
        self._device_thread = device_thread or DeviceThread("arcdiff-engine")
        self._loop: Future | None = None
        self._next_deadline_check = 0.0
        self._sample_memory = m.MemorySampler(self.device)
        self._ready = threading.Event()
        self.warm_up_s: dict[str, float] = {}  # model -> seconds its warm-up took

    # ---- caller side (any thread) ----------------------------------------------------------

    @property
    def models(self) -> list[str]:
        return list(self._runners)

    def start(self) -> Engine:
        """Start the device thread; returns once it is warmed up and serving."""
        if self._loop is not None:
            raise RuntimeError("engine already started")
        self._loop = self._device_thread.submit(self._run)
        while not self._ready.wait(0.1):
            if self._loop.done():  # died before it was ready: say why
                self._loop.result()
                raise RuntimeError("engine thread ended during warm-up")
        return self

    @property
    def alive(self) -> bool:
        return self._loop is not None and not self._loop.done() and not self._closing

    def submit(self, spec: GenerationSpec, timeout_s: float | None = None, listener: Listener | None = None) -> Future:
        """Queue a generation; the future resolves to a JobResult or raises GenerationFailed
        (GenerationCanceled when canceled).

        It fails if not done `timeout_s` (default: the engine's job_timeout_s) after submission.
        `listener` gets its progress (and, with spec.preview, its previews) while it runs."""
        if spec.model not in self._runners:
            raise ValueError(f"model {spec.model!r} is not loaded here; loaded: {', '.join(self._runners)}")
        fut: Future = Future()
        # an expired spec never runs; an edit's inputs are checked against the model here, before
        # they can reach a tick (where a bad one would fail the whole batch): the API checked them
        # too, a queue payload may not have
        try:
            if expired := queue_expiry(spec, self.config.queue_timeout_s, time.time()):
                raise SpecError(expired)
            inputs = decode_inputs(spec, self._runners[spec.model].prepared.loaded.image_shape)
        except SpecError as e:
            log.warning("generation %s failed: %s", spec.id, e)
            m.JOBS.labels(spec.model, "failed").inc()
            fut.set_exception(GenerationFailed(str(e)))
            return fut
        timeout_s = timeout_s if timeout_s is not None else self.config.job_timeout_s
        deadline = time.monotonic() + timeout_s if timeout_s else None
        task = Generation(spec, fut, deadline, timeout_s, listener=listener, inputs=inputs)
        with self._cond:
            if self._closing:
                raise RuntimeError("engine is closed")
            if spec.id in self._tasks:
                raise ValueError(f"generation {spec.id} is already held")
            self._tasks[spec.id] = task
            sched = self._runners[spec.model].sched
            sched.add(task)
            m.WAITING.labels(spec.model).set(sched.n_waiting())
            self._cond.notify_all()
        return fut

    def submit_many(self, specs: Iterable[GenerationSpec]) -> list[Future]:
        """Queue several generations under one lock, so that the device thread plans its next tick
        with all of them (one submit() after another may straddle a tick)."""
        with self._cond:  # re-entrant: each submit() takes it again
            return [self.submit(spec) for spec in specs]

    def status(self, job_id: str) -> str | None:
        """'queued' or 'running' for a generation held here, None otherwise."""
        with self._cond:
            task = self._tasks.get(job_id)
            return task.state if task else None

    def held(self) -> int:
        with self._cond:
            return len(self._tasks)

    def occupancy(self, model: str) -> Occupancy:
        """A snapshot of `model`'s queue and batch: waiting, running, paused images, per client."""
        with self._cond:
            return self._runners[model].sched.occupancy()

    def has_room(self, model: str, priority: str = "interactive") -> bool:
        """Whether taking another generation for `model` would not just sit behind a full batch."""
        with self._cond:
            return self._room(model, priority)

    def _room(self, model: str, priority: str) -> bool:
        return self._runners[model].sched.has_room(priority)

    def wait_for_room(self, queues: Iterable[tuple[str, str]], timeout: float) -> list[tuple[str, str]]:
        """Block until some of `queues` ((model, priority) pairs) has room (or timeout); returns
        those that do."""
        queues = list(queues)
        with self._cond:
            self._cond.wait_for(lambda: self._closing or any(self._room(*q) for q in queues), timeout)
            return [q for q in queues if self._room(*q)]

    def wait_idle(self, timeout: float) -> bool:
        """Block until no generation is held (or timeout); True when idle."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._tasks, timeout)

    def fail(self, job_id: str, reason: str) -> bool:
        """Fail a held generation now (its rows leave the batch at the next tick)."""
        with self._cond:
            task = self._tasks.get(job_id)
        return task is not None and self._close(task, error=reason)

    def cancel(self, job_id: str) -> bool:
        """Cancel a held generation: a waiting one never runs, a running one's rows leave the batch
        at the next tick (their slots go to others then). False when not held here."""
        with self._cond:
            task = self._tasks.get(job_id)
        return task is not None and self._close(task, error="canceled on request", canceled=True)

    def take_unstarted(self) -> list[GenerationSpec]:
        """Give back generations none of whose images has entered the batch (to requeue them)."""
        with self._cond:
            tasks = [t for t in self._tasks.values() if t.state == "queued"]
        return [t.spec for t in tasks if self._close(t, cancel=True)]

    def take_all(self) -> list[GenerationSpec]:
        """Give back every generation still held (to requeue them); their rows are dropped."""
        with self._cond:
            tasks = list(self._tasks.values())
        return [t.spec for t in tasks if self._close(t, cancel=True)]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the device thread; generations still held fail with 'engine stopped'."""
        with self._cond:
            self._closing = True
            tasks = list(self._tasks.values())
            self._cond.notify_all()
        for t in tasks:
            self._close(t, error="engine stopped before the generation finished")
        if self._loop is not None:
            # a loop that died already logged why; a slow one is left behind
            with contextlib.suppress(Exception):
                self._loop.result(timeout)
        self._device_thread.shutdown(timeout)
        self._encoder.close()

    # ---- resolution (any thread) ---------------------------------------------------------------

    def _close(
        self,
        task: Generation,
        result: JobResult | None = None,
        error: str | None = None,
        cancel: bool = False,
        canceled: bool = False,
    ) -> bool:
        """Resolve a generation exactly once; whoever closes it first wins."""
        with self._cond:
            if task.closed:
                return False
            task.closed = True
            self._tasks.pop(task.spec.id, None)
            r = self._runners[task.spec.model]
            if task.admitted < task.spec.n:
                r.sched.discard(task)
                m.WAITING.labels(r.name).set(r.sched.n_waiting())
            if task.in_batch:
                r.dirty = True
            self._cond.notify_all()
        task.resolve(result, error, cancel, canceled)
        return True

    # ---- device thread -------------------------------------------------------------------------

    def _run(self) -> None:
        log.info(
            "engine on %s: models %s, max batch %d, buckets %s",
            self.device,
            ", ".join(self._runners),
            self.max_batch,
            self.buckets,
        )
        self._sample_memory()
        with torch.inference_mode():
            try:
                if self.config.warm_up:
                    self._warm_up_all()
            finally:
                self._ready.set()
            while True:
                with self._cond:
                    if not self._closing and not any(self._has_work(r) for r in self._runners.values()):
                        self._cond.wait(timeout=1.0)
                    if self._closing:
                        break
                self._check_deadlines()  # outside the lock: closing resolves futures, which runs callbacks
                for r in self._runners.values():
                    if self._has_work(r):
                        try:
                            self._tick(r)
                        except Exception as e:  # a broken tick fails the generations in it, not the engine
                            log.exception("tick of %s failed", r.name)
                            self._reset(r, f"engine error during sampling: {type(e).__name__}: {e}")
                self._sample_memory()
        log.info("engine stopped")

    def _warm_up_all(self) -> None:
        """Warm every model up on this thread; one that cannot be served leaves the engine."""
        for name, r in list(self._runners.items()):
            try:
                r.forward, self.warm_up_s[name] = warm_up(name, r.prepared, self.buckets, self.device)
            except WarmUpFailed as e:
                self.failed_models[name] = str(e)
                del self._runners[name]
        if self.config.recompile_stance:
            torch.compiler.set_stance(self.config.recompile_stance)

    @staticmethod
    def _has_work(r: _Runner) -> bool:
        return r.sched.has_work() or r.dirty

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if now < self._next_deadline_check:
            return
        self._next_deadline_check = now + 0.5
        wall, limit = time.time(), self.config.queue_timeout_s
        with self._cond:
            overdue = [(t, why) for t in self._tasks.values() if (why := t.overdue(now, wall, limit))]
        for t, why in overdue:
            self._close(t, error=why)

    def _tick(self, r: _Runner) -> None:
        # 1. the plan: the scheduler admits images and picks the rows that run, with the forward
        #    times measured so far; admitted images join their groups with a fresh state
        if r.dirty:
            self._drop_closed(r)
        times = r.clock.take()
        with self._cond:
            r.sched.update_from_output(forward=times)
            plan = r.sched.schedule()
            self._admitted(r, plan)
        m.PAUSED.labels(r.name).set(plan.paused)
        r.batch.join(plan.admitted)
        if not plan.rows:
            return
        # 2. gather the rows' next points, padded to the plan's size; 3. one forward, timed
        x, eta = r.batch.gather(plan.run, plan.size)
        x0_hat, eps_hat = r.clock.run(r.forward, x, eta)
        m.BATCH_SIZE.labels(r.name).observe(plan.rows)
        now = time.monotonic()
        tasks = list(r.active.values())
        if plan.paused:  # only some rows had an evaluation: count them
            counts: Mapping[Generation, int] = Counter(task for task, _k, _left in r.batch.ran(plan.run))
        else:  # every row in the batch had one
            counts = {task: task.in_batch for task in tasks}
        for task, count in counts.items():
            task.out.batch_sizes.add(plan.rows)
            task.nfe_done += count
        due = {t for t in tasks if t.spec.preview and t.listener is not None and now >= t.next_preview}
        if due:  # before the groups advance: a preview shows this evaluation's x0_hat
            self._encoder.previews(r.batch.ran(plan.run), due, x0_hat, r.data_range)
            for task in due:
                task.next_preview = now + self.config.preview_interval_s
        # 4. scatter back: each group advances its rows that ran; finished rows leave and are encoded
        for key, rows in plan.run:
            m.NFE.labels(r.name, key[0]).inc(rows)
        for key, owners, xs in r.batch.scatter(plan.run, x0_hat, eps_hat):
            self._finish(r, key, owners, xs)
        for task in tasks:
            if now >= task.next_progress or task.images_done != task.reported_images:
                task.report(now, self.config.progress_interval_s)

    def _admitted(self, r: _Runner, plan: TickPlan[Generation]) -> None:
        """The plan's admitted images are in the batch: count them in (call under the lock)."""
        now = time.time()
        for task, _k in plan.admitted:
            task.admit(now)
            r.active[task.spec.id] = task
        m.WAITING.labels(r.name).set(r.sched.n_waiting())
        m.RUNNING.labels(r.name).set(r.sched.running())

    def _finish(self, r: _Runner, key: GroupKey, owners: list[tuple[Generation, int]], xs: torch.Tensor) -> None:
        """Rows that left the batch: encode the good ones, fail the generations of non-finite ones."""
        finite = torch.isfinite(xs).flatten(1).all(dim=1).tolist()
        pixels = to_uint8(xs, r.data_range)
        now = time.time()
        failed: list[tuple[Generation, str]] = []
        encodes: list[tuple[Generation, int, torch.Tensor]] = []
        with self._cond:
            self._left(r, key, owners)
            for row, ((task, k), ok, px) in enumerate(zip(owners, finite, pixels, strict=True)):
                if task.closed:
                    continue
                if not ok:
                    failed.append((task, task.non_finite(k)))
                    continue
                encoding = task.spec.kind == "encode"  # its result is the float latent, its PNG a picture of it
                keep = self.config.keep_samples or encoding
                task.image_done(k, now, xs[row].float().cpu() if keep else None)
                encodes.append((task, k, to_uint8(xs[row : row + 1], LATENT_RANGE)[0] if encoding else px))
            m.RUNNING.labels(r.name).set(r.sched.running())
            self._cond.notify_all()
        # the progress that counts these images goes out before their encoding can end the generation
        for task in dict.fromkeys(t for t, _k, _px in encodes):
            task.report(time.monotonic(), self.config.progress_interval_s)
        for task, k, px in encodes:
            self._encoder.image(r.name, task, k, px)
        for task, reason in failed:
            self._close(task, error=reason)

    @staticmethod
    def _left(r: _Runner, key: GroupKey, owners: list[tuple[Generation, int]]) -> None:
        """Rows of group `key` left the batch, finished or dropped (call under the lock)."""
        r.sched.update_from_output(left=[(key, owners)])
        for task, _k in owners:
            task.in_batch -= 1
            if task.in_batch == 0:
                r.active.pop(task.spec.id, None)

    def _drop_closed(self, r: _Runner) -> None:
        """Remove the rows of generations that were failed or taken back."""
        with self._cond:
            r.dirty = False
            for key, owners in r.batch.drop(lambda task: task.closed):
                self._left(r, key, owners)
            m.RUNNING.labels(r.name).set(r.sched.running())
            self._cond.notify_all()

    def _reset(self, r: _Runner, reason: str) -> None:
        """After a failed tick: fail every generation with rows in the batch and empty it."""
        with self._cond:
            tasks = list(r.active.values())
            r.batch.clear()
            r.active.clear()
            for task in tasks:
                task.in_batch = 0
            r.sched.reset()
            m.PAUSED.labels(r.name).set(0)
            self._cond.notify_all()
        for task in tasks:
            self._close(task, error=reason)

    # ---- encode threads ----------------------------------------------------------------------

    def _encoded(self, task: Generation, k: int, png: bytes) -> None:
        """Image k of `task` is encoded; the last of its images completes it."""
        with self._cond:
            if task.closed:
                return
            task.out.pngs[k] = png
            done = len(task.out.pngs) == task.spec.n
        if done:
            result = job_result(task.spec, task.out, str(self.device), self.worker, self.config.keep_samples)
            self._close(task, result=result)
