"""The continuous-batching engine: one running batch per model that images join and leave at every
network evaluation ("tick").

Each tick, for each model with work:
1. admit waiting images, interactive ones first, FIFO within a priority: interactive images up to
   max_batch of them, batch images while the whole batch holds fewer than max_batch (so an
   interactive image gets in beside a full batch of batch images); a client at its cap
   (max_images_per_key) waits while others go first. Each image gets its own generator seeded
   from (request seed, image index), its own step grid and a fresh solver state in its
   (solver, priority) group;
2. choose the rows that run: with no interactive rows, all of them. With interactive rows, all of
   those, and batch rows only while the whole tick's predicted forward time stays within the tick
   budget (see _batch_rows; predictions come from the forward times measured per batch size): on a
   GPU a larger batch costs little more and batch rows keep running, on a CPU they pause, their
   state and noise streams untouched, and resume when the interactive images are done;
3. gather every running row's next point (x, eta) into one tensor; a compiled network gets it
   padded to a bucket size (1, 2, 4, ..., max_batch) so it sees few shapes, an eager one the
   exact batch (on a CPU a padded row costs as much as a real one);
4. one forward -> (x0_hat, eps_hat), timed (CUDA events, read a tick later, on a GPU);
5. scatter back: each solver group advances all its running rows in one vectorised call; finished rows
   leave (known on the host: no device sync per tick), are turned into pixels in one op and
   PNG-encoded on a thread pool; a generation completes when all its images are encoded. A row
   that ends non-finite fails its generation (with the reason), not the batch; rows never mix in
   the network (group norm and attention are per image), so one NaN image cannot spoil another.

One device thread runs the ticks (round robin over models); callers talk to it through a lock
and get a concurrent.futures.Future per generation. Nothing here knows about HTTP or Redis.
Warm-up and the eager fallback live beside loading (loading.py), result assembly in results.py.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from arcdiff.contract import PRIORITIES, GenerationSpec, JobResult, queue_expiry
from arcdiff.model.format import LoadedModel
from arcdiff.model.images import png_bytes, to_uint8
from arcdiff.model.rng import image_generator, image_seed, initial_noise
from arcdiff.model.solvers import nfe as solver_nfe
from arcdiff.worker import metrics as m
from arcdiff.worker.batch import ForwardTimes, SolverGroup, bucket_for, bucket_sizes
from arcdiff.worker.device_thread import DeviceThread
from arcdiff.worker.loading import PAD_ETA, Forward, Prepared, WarmUpFailed, warm_up
from arcdiff.worker.results import Collected, encode_png, job_result

log = logging.getLogger("arcdiff.engine")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# while batch rows run beside interactive ones, the interactive rows run alone at least once per this
# many forwards, so that their own forward time, against which the budget is set, stays current
REFRESH_AFTER = 16


class GenerationFailed(Exception):
    """A generation the engine could not finish; str() is the reason shown to the client."""


class GenerationCanceled(GenerationFailed):
    """A generation canceled on request (Engine.cancel)."""


# called with (event, data) as a generation runs: "progress" {"nfe_done", "nfe_total", "images_done"}
# from the device thread, "preview" {"index", "nfe_done", "png_base64"} from an encode thread; it
# must only hand the event on (no I/O): it runs inside the tick
Listener = Callable[[str, dict], None]


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings (plain values; the models and threads it runs are passed beside it).

    `buckets`: the padded batch sizes (default 1, 2, 4, ..., max_batch); the largest must be
    max_batch. Batches are padded to them only with `warm_up` (a compiled network, which wants
    few shapes); otherwise the network runs the exact batch. A benchmark that always runs full
    batches warms up just (max_batch,).
    `warm_up`: before serving, call every model's forward once per bucket on the device thread
    (compiles there; CUDA graphs are recorded per thread), see loading.warm_up.
    `recompile_stance`: torch.compiler stance set after the warm-up ("eager_on_recompile" in the
    worker: an unexpected new shape runs eagerly instead of stalling the batch for a compile;
    tests use "fail_on_recompile")."""

    device: str | torch.device = "cpu"
    max_batch: int = 32
    buckets: tuple[int, ...] | None = None
    encode_threads: int = 2
    worker: str = ""  # the name shown in each result's metrics
    job_timeout_s: float | None = None  # a generation not done this long after submission fails
    # a generation still waiting this long after it was accepted (spec.submitted_at, so time
    # spent in Redis counts) fails instead of starting
    queue_timeout_s: float | None = None
    keep_samples: bool = False  # also return the float samples (tests, local tools)
    warm_up: bool = False
    recompile_stance: str | None = None
    progress_interval_s: float = 0.25  # at most one progress event per generation this often
    preview_interval_s: float = 0.5  # at most one round of previews per generation this often
    # while interactive rows run, a tick's forward may take tick_budget x their own predicted time,
    # and at least tick_budget_min_s more than it; batch rows fill that (see Engine._batch_rows)
    tick_budget: float = 1.2
    tick_budget_min_s: float = 0.001
    # paused batch rows still get at least this much forward time, as a fraction of the interactive
    # rows' own (0: none; a constant interactive stream then starves them)
    batch_min_share: float = 0.05
    max_images_per_key: int = 0  # images of one client (spec.client) in the batch at once; 0: no cap

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.tick_budget < 1 or self.tick_budget_min_s < 0 or self.batch_min_share < 0:
            raise ValueError("tick_budget must be at least 1, tick_budget_min_s and batch_min_share at least 0")
        if self.max_images_per_key < 0:
            raise ValueError(f"max_images_per_key must be at least 0, got {self.max_images_per_key}")
        buckets = self.bucket_sizes
        if buckets[-1] != self.max_batch or buckets[0] < 1:
            raise ValueError(f"buckets {buckets} must be positive and end at max_batch {self.max_batch}")

    @property
    def bucket_sizes(self) -> list[int]:
        return sorted(set(self.buckets)) if self.buckets else bucket_sizes(self.max_batch)


@dataclass(eq=False)
class _Task:
    """One generation held by the engine."""

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

    @property
    def nfe_per_image(self) -> int:
        return solver_nfe(self.spec.solver, self.spec.steps)

    def emit(self, event: str, data: dict) -> None:
        if self.listener is None or self.closed:
            return
        try:
            self.listener(event, data)
        except Exception:  # a broken listener must not break the batch
            log.exception("event listener of %s failed", self.spec.id)


class _Runner:
    """The batch of one model: its waiting images, its solver groups and its network."""

    def __init__(self, name: str, prepared: Prepared):
        self.name = name
        self.prepared = prepared
        self.forward: Forward = prepared.forward
        self.shape = prepared.loaded.image_shape
        self.data_range = prepared.loaded.config.get("data_range", [-1.0, 1.0])
        # (generation, image index), FIFO per priority
        self.waiting: dict[str, deque[tuple[_Task, int]]] = {p: deque() for p in PRIORITIES}
        self.groups: dict[tuple[str, str], SolverGroup] = {}  # by (solver, priority)
        self.active: dict[str, _Task] = {}  # generations with rows in the batch, by id
        # rows in the batch, in all and per priority and per client (kept under the engine lock)
        self.in_batch = 0
        self.rows: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
        self.client_rows: Counter[str] = Counter()
        self.dirty = False  # a generation with rows in the batch was closed: drop its rows
        self.times = ForwardTimes()  # measured forward seconds per batch size
        self.pending_times: deque[tuple[int, torch.cuda.Event, torch.cuda.Event]] = deque()  # GPU timings to read
        self.credit = 0.0  # seconds of forward time owed to paused batch rows (batch_min_share)
        self.paused = 0  # batch rows that sat out the last tick
        self.turn = 0  # which batch group goes first when only some batch rows run

    def n_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())


class Engine:
    """Runs generations for a set of loaded models on one device with continuous batching."""

    def __init__(
        self,
        models: Mapping[str, Prepared | LoadedModel],
        config: EngineConfig = EngineConfig(),
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
        self.config = config
        self.device = torch.device(config.device)
        self.max_batch = config.max_batch
        self.buckets = config.bucket_sizes
        self.worker = config.worker
        self.failed_models = dict(failed_models or {})  # models not served: name -> why
        self._runners = {name: _Runner(name, Prepared.of(p)) for name, p in models.items()}
        for name in self._runners:
            m.init_model_series(name)
        self._tasks: dict[str, _Task] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._pool = ThreadPoolExecutor(max_workers=config.encode_threads, thread_name_prefix="arcdiff-encode")
        # previews get one thread of their own: in submission order, so a generation's previews reach
        # its listeners in evaluation order (a stale one never replaces a newer one on screen)
        self._preview_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arcdiff-preview")
        self._device_thread = device_thread or DeviceThread("arcdiff-engine")
        self._loop: Future | None = None
        self._next_deadline_check = 0.0
        self._next_memory_sample = 0.0
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
        expired = self._expired_reason(spec, time.time())
        if expired:
            log.warning("generation %s failed: %s", spec.id, expired)
            m.JOBS.labels(spec.model, "failed").inc()
            fut.set_exception(GenerationFailed(expired))
            return fut
        timeout_s = timeout_s if timeout_s is not None else self.config.job_timeout_s
        deadline = time.monotonic() + timeout_s if timeout_s else None
        task = _Task(spec, fut, deadline, timeout_s, listener=listener)
        with self._cond:
            if self._closing:
                raise RuntimeError("engine is closed")
            if spec.id in self._tasks:
                raise ValueError(f"generation {spec.id} is already held")
            self._tasks[spec.id] = task
            runner = self._runners[spec.model]
            runner.waiting[spec.priority].extend((task, k) for k in range(spec.n))
            m.WAITING.labels(spec.model).set(runner.n_waiting())
            self._cond.notify_all()
        return fut

    def status(self, job_id: str) -> str | None:
        """'queued' or 'running' for a generation held here, None otherwise."""
        with self._cond:
            task = self._tasks.get(job_id)
            return task.state if task else None

    def report_as_worker(self) -> None:
        """Set the worker gauges (up, busy) from this engine's state: in embedded mode the
        in-process engine is the deployment's one worker and no RQ worker sets them."""
        m.UP.set(1 if self.alive else 0)
        m.BUSY.set(1 if self.held() else 0)

    def held(self) -> int:
        with self._cond:
            return len(self._tasks)

    def waiting_images(self, model: str) -> int:
        with self._cond:
            return self._runners[model].n_waiting()

    def running_images(self, model: str, priority: str | None = None) -> int:
        """Images in the batch (running or paused), of one priority or all."""
        with self._cond:
            r = self._runners[model]
            return r.in_batch if priority is None else r.rows[priority]

    def clients(self, model: str) -> dict[str, int]:
        """Images in the batch per client (spec.client), for the per-client cap."""
        with self._cond:
            return dict(self._runners[model].client_rows)

    def paused_images(self, model: str) -> int:
        """Batch images in the batch that sat out the last tick beside interactive ones."""
        with self._cond:
            return self._runners[model].paused

    def _blocked(self, r: _Runner, priority: str | None = None) -> int:
        """Waiting images (of `priority`, or all) that the per-client cap holds back now."""
        cap = self.config.max_images_per_key
        if not cap:
            return 0
        # a client's free slots go to its interactive images first, as in _admit
        free = {c: max(0, cap - n) for c, n in r.client_rows.items()}
        blocked = 0
        for p in PRIORITIES:
            for task, _k in r.waiting[p]:
                c = task.spec.client
                left = free.get(c, cap)
                if left:
                    free[c] = left - 1
                elif priority in (None, p):
                    blocked += 1
        return blocked

    def _room(self, model: str, priority: str) -> bool:
        """Whether a generation of `priority` taken now would not just sit behind a full batch.

        Interactive images have a batch's worth of room of their own (batch rows pause for them),
        batch images the room that all images leave. Images the per-client cap holds back do not
        take room (others go first), up to a batch's worth of them."""
        r = self._runners[model]
        blocked = self._blocked(r)
        if blocked >= self.max_batch:
            return False
        if priority == "batch":
            return r.n_waiting() - blocked + r.in_batch < self.max_batch
        held = len(r.waiting["interactive"]) - self._blocked(r, "interactive") + r.rows["interactive"]
        return held < self.max_batch

    def has_room(self, model: str, priority: str = "interactive") -> bool:
        """Whether taking another generation for `model` would not just sit behind a full batch."""
        with self._cond:
            return self._room(model, priority)

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
            try:
                self._loop.result(timeout)
            except Exception:  # a loop that died already logged why; a slow one is left behind
                pass
        self._device_thread.shutdown(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._preview_pool.shutdown(wait=True, cancel_futures=True)

    # ---- resolution (any thread) ---------------------------------------------------------------

    def _close(
        self,
        task: _Task,
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
                q = r.waiting[task.spec.priority]
                r.waiting[task.spec.priority] = deque(item for item in q if item[0] is not task)
                m.WAITING.labels(r.name).set(r.n_waiting())
            if task.in_batch:
                r.dirty = True
            self._cond.notify_all()
        status = "finished" if result is not None else "requeued" if cancel else "canceled" if canceled else "failed"
        m.JOBS.labels(task.spec.model, status).inc()
        if cancel:
            task.future.cancel()
            return True
        if error is not None:
            log.log(
                logging.INFO if canceled else logging.WARNING,
                "generation %s %s: %s",
                task.spec.id,
                "canceled" if canceled else "failed",
                error,
            )
        try:
            if error is not None:
                task.future.set_exception((GenerationCanceled if canceled else GenerationFailed)(error))
            else:
                task.future.set_result(result)
        except InvalidStateError:  # a caller cancelled its future: nobody is waiting for it
            pass
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
        return any(r.waiting.values()) or r.in_batch > 0 or r.dirty

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if now < self._next_deadline_check:
            return
        self._next_deadline_check = now + 0.5
        wall = time.time()
        with self._cond:
            late = [t for t in self._tasks.values() if t.deadline is not None and now > t.deadline]
            stale = [t for t in self._tasks.values() if t.state == "queued" and self._expired_reason(t.spec, wall)]
        for t in late:
            self._close(t, error=f"timed out after {t.timeout_s:g} s")
        for t in stale:
            self._close(t, error=self._expired_reason(t.spec, wall))

    def _expired_reason(self, spec: GenerationSpec, wall: float) -> str | None:
        return queue_expiry(spec, self.config.queue_timeout_s, wall)

    def _sample_memory(self) -> None:
        """Device memory in use, once a second: CUDA's allocator on a GPU, the process's RSS on CPU."""
        now = time.monotonic()
        if now < self._next_memory_sample:
            return
        self._next_memory_sample = now + 1.0
        if self.device.type == "cuda":
            used: int | None = torch.cuda.memory_allocated(self.device)
        else:
            used = _rss_bytes()
        if used is not None:
            m.DEVICE_MEMORY.labels(str(self.device)).set(used)

    def _tick(self, r: _Runner) -> None:
        if r.dirty:
            self._drop_closed(r)
        self._admit(r)
        self._read_times(r)
        parts = self._plan(r)
        n = sum(rows for _g, rows in parts)
        if n == 0:
            return
        points = [g.point(rows) for g, rows in parts]
        x = torch.cat([p[0] for p in points])
        eta = torch.cat([p[1] for p in points])
        b = bucket_for(n, self.buckets) if self.config.warm_up else n
        if b > n:
            x = torch.cat([x, x.new_zeros((b - n, *x.shape[1:]))])
            eta = torch.cat([eta, eta.new_full((b - n,), PAD_ETA)])
        x0_hat, eps_hat = self._forward(r, x, eta)
        m.BATCH_SIZE.labels(r.name).observe(n)
        now = time.monotonic()
        tasks = list(r.active.values())
        if r.paused:  # only some rows had an evaluation: count them
            ran = Counter(task for g, rows in parts for task, _k in g.slots[:rows])
            for task, count in ran.items():
                task.out.batch_sizes.add(n)
                task.nfe_done += count
        else:
            for task in tasks:
                task.out.batch_sizes.add(n)
                task.nfe_done += task.in_batch  # every row in the batch had one evaluation
        previews = [t for t in tasks if t.spec.preview and t.listener is not None and now >= t.next_preview]
        if previews:
            self._preview(r, parts, x0_hat, previews, now)
        offset = 0
        for g, rows in parts:
            leave = g.advance(x0_hat[offset : offset + rows], eps_hat[offset : offset + rows], rows)
            offset += rows
            m.NFE.labels(r.name, g.impl.name).inc(rows)
            if leave:
                owners, xs = g.remove(leave)
                self._finish(r, g.impl.name, owners, xs)
        for task in tasks:
            if now >= task.next_progress or task.images_done != task.reported_images:
                self._report(task, now)

    def _plan(self, r: _Runner) -> list[tuple[SolverGroup, int]]:
        """The rows that run this tick: (group, its first rows). Every interactive row; batch rows
        as _batch_rows allows, the oldest first, the group that goes first taking turns."""
        interactive = [g for (_s, p), g in r.groups.items() if p == "interactive" and len(g)]
        batch = [g for (_s, p), g in r.groups.items() if p == "batch" and len(g)]
        n_i, n_b = sum(len(g) for g in interactive), sum(len(g) for g in batch)
        if n_i:
            k = self._batch_rows(r, n_i, n_b) if n_b else 0
        else:
            k, r.credit = n_b, 0.0
        if r.paused != n_b - k:
            r.paused = n_b - k
            m.PAUSED.labels(r.name).set(r.paused)
        parts = [(g, len(g)) for g in interactive]
        if k == n_b:
            return parts + [(g, len(g)) for g in batch]
        r.turn = (r.turn + 1) % len(batch)
        for g in batch[r.turn :] + batch[: r.turn]:
            if k <= 0:
                break
            parts.append((g, min(k, len(g))))
            k -= len(g)
        return parts

    def _size(self, rows: int) -> int:
        """The rows the network runs for `rows` images (padded to a bucket when compiled)."""
        return bucket_for(rows, self.buckets) if self.config.warm_up else rows

    def _batch_rows(self, r: _Runner, n_i: int, n_b: int) -> int:
        """How many of the n_b batch rows run beside n_i interactive ones this tick.

        The tick's predicted forward time may exceed that of the interactive rows alone (t_i) by
        max((tick_budget - 1) t_i, tick_budget_min_s), plus the credit that batch_min_share lends
        paused rows (share x t_i per tick while some are paused). The forward never exceeds
        max_batch rows. Before anything was measured the interactive rows run alone once."""
        cfg = self.config
        fit = min(n_b, self.max_batch - n_i)
        t_i = r.times.predict(self._size(n_i))
        if fit <= 0 or t_i is None:
            return 0
        free = max((cfg.tick_budget - 1.0) * t_i, cfg.tick_budget_min_s)
        allowed = free + r.credit

        def extra(k: int) -> float:
            return (r.times.predict(self._size(n_i + k)) or 0.0) - t_i

        # the largest k whose extra time is allowed (predictions grow with rows); none when nothing
        # is allowed (strict priority: not even a row that measured "free"), nor when the
        # interactive rows' own time has not been measured lately: they run alone once to refresh
        # it (on a shared machine forward times drift, and a stale t_i would move the budget)
        fresh = not r.times.stale(self._size(n_i), REFRESH_AFTER)
        lo, hi = 0, fit if allowed > 0 and fresh else 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if extra(mid) <= allowed:
                lo = mid
            else:
                hi = mid - 1
        if lo == n_b:
            r.credit = 0.0
        else:
            spent = max(0.0, extra(lo) - free) if lo else 0.0
            r.credit = min(max(0.0, r.credit - spent) + cfg.batch_min_share * t_i, max(0.0, extra(fit)))
        return lo

    def _forward(self, r: _Runner, x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network on one batch, timed for r.times: on a GPU with CUDA events read back at a
        later tick (no sync), elsewhere by the host's clock (on MPS: the launch only)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = r.forward(x, eta)
            end.record()
            r.pending_times.append((x.shape[0], start, end))
            return out
        t0 = time.perf_counter()
        out = r.forward(x, eta)
        r.times.add(x.shape[0], time.perf_counter() - t0)
        return out

    @staticmethod
    def _read_times(r: _Runner) -> None:
        """Take in the GPU timings whose forwards have ended (oldest first; query() does not block)."""
        while r.pending_times and (len(r.pending_times) > 64 or r.pending_times[0][2].query()):
            rows, start, end = r.pending_times.popleft()
            if end.query():
                r.times.add(rows, start.elapsed_time(end) / 1000.0)

    def _report(self, task: _Task, now: float) -> None:
        task.next_progress = now + self.config.progress_interval_s
        task.reported_images = task.images_done
        task.emit(
            "progress",
            {"nfe_done": task.nfe_done, "nfe_total": task.nfe_per_image * task.spec.n, "images_done": task.images_done},
        )

    def _preview(
        self, r: _Runner, parts: list[tuple[SolverGroup, int]], x0_hat: torch.Tensor, tasks: list[_Task], now: float
    ) -> None:
        """Copy the x0_hat rows of `tasks` (the clean estimate at this evaluation, no extra network
        call) and PNG-encode them off the device thread. Called before the groups advance."""
        due = set(tasks)
        rows: list[int] = []
        owners: list[tuple[_Task, int, int]] = []  # (generation, image index, its evaluations so far)
        offset = 0
        for g, ran in parts:
            for i, (task, k) in enumerate(g.slots[:ran]):
                if task in due:
                    rows.append(offset + i)
                    owners.append((task, k, task.nfe_per_image - g.remaining[i] + 1))
            offset += ran
        for task in tasks:
            task.next_preview = now + self.config.preview_interval_s
        if rows:
            pixels = to_uint8(x0_hat[torch.tensor(rows, device=x0_hat.device)].float(), r.data_range)
            self._preview_pool.submit(self._encode_previews, owners, pixels)

    def _admit(self, r: _Runner) -> None:
        picked: list[tuple[_Task, int]] = []
        now = time.time()
        cap = self.config.max_images_per_key
        with self._cond:
            for priority in PRIORITIES:  # interactive first: batch room is what it leaves
                q = r.waiting[priority]
                room = self.max_batch - (r.rows[priority] if priority == "interactive" else r.in_batch)
                kept: deque[tuple[_Task, int]] = deque()
                while room > 0 and q:
                    item = q.popleft()
                    if cap and r.client_rows[item[0].spec.client] >= cap:
                        kept.append(item)  # its client is at the cap: others go first
                        continue
                    self._take(r, *item, now)
                    picked.append(item)
                    room -= 1
                if kept:
                    kept.extend(q)
                    r.waiting[priority] = kept
            m.WAITING.labels(r.name).set(r.n_waiting())
            m.RUNNING.labels(r.name).set(r.in_batch)
        if not picked:
            return
        by_group: dict[tuple[str, str], list[tuple[_Task, int]]] = {}
        for item in picked:
            by_group.setdefault((item[0].spec.solver, item[0].spec.priority), []).append(item)
        for key, items in by_group.items():
            gens = [image_generator(image_seed(t.spec.seed, k)) for t, k in items]
            x_T = torch.stack([initial_noise(r.shape, g) for g in gens]).to(self.device)
            steps = torch.tensor([t.spec.steps for t, _ in items])  # on the host: the group counts down there
            group = r.groups.get(key)
            if group is None:
                group = r.groups[key] = SolverGroup(key[0])
            group.add(x_T, steps, items, gens, [t.spec.schedule for t, _ in items])

    @staticmethod
    def _take(r: _Runner, task: _Task, k: int, now: float) -> None:
        """Image k of `task` enters the batch (call under the lock)."""
        task.admitted += 1
        task.in_batch += 1
        r.in_batch += 1
        r.rows[task.spec.priority] += 1
        r.client_rows[task.spec.client] += 1
        r.active[task.spec.id] = task
        if task.state == "queued":
            task.state = "running"
            task.out.first_admit = now
            m.QUEUE_WAIT.labels(r.name).observe(max(0.0, now - task.spec.submitted_at))

    def _finish(self, r: _Runner, solver: str, owners: list[tuple[_Task, int]], xs: torch.Tensor) -> None:
        """Rows that left the batch: encode the good ones, fail the generations of non-finite ones."""
        finite = torch.isfinite(xs).flatten(1).all(dim=1).tolist()
        pixels = to_uint8(xs, r.data_range)
        now = time.time()
        failed: list[tuple[_Task, str]] = []
        encodes: list[tuple[_Task, int, torch.Tensor]] = []
        with self._cond:
            for row, ((task, k), ok, px) in enumerate(zip(owners, finite, pixels, strict=True)):
                self._leave(r, task)
                if task.closed:
                    continue
                if not ok:
                    failed.append(
                        (
                            task,
                            f"image {k} (seed {image_seed(task.spec.seed, k)}) became non-finite "
                            f"(NaN or inf) during sampling",
                        )
                    )
                    continue
                task.out.last_leave = now
                task.images_done += 1
                if self.config.keep_samples:
                    task.out.samples[k] = xs[row].float().cpu()
                m.IMAGES.labels(r.name, solver).inc()
                encodes.append((task, k, px))
            m.RUNNING.labels(r.name).set(r.in_batch)
            self._cond.notify_all()
        # the progress that counts these images goes out before their encoding can end the generation
        for task in dict.fromkeys(t for t, _k, _px in encodes):
            self._report(task, time.monotonic())
        for task, k, px in encodes:
            self._pool.submit(self._encode, r, task, k, px)
        for task, reason in failed:
            self._close(task, error=reason)

    @staticmethod
    def _leave(r: _Runner, task: _Task) -> None:
        """One row of `task` left the batch (call under the lock)."""
        task.in_batch -= 1
        r.in_batch -= 1
        r.rows[task.spec.priority] -= 1
        r.client_rows[task.spec.client] -= 1
        if r.client_rows[task.spec.client] <= 0:
            del r.client_rows[task.spec.client]
        if task.in_batch == 0:
            r.active.pop(task.spec.id, None)

    def _drop_closed(self, r: _Runner) -> None:
        """Remove the rows of generations that were failed or taken back."""
        with self._cond:
            r.dirty = False
            for g in r.groups.values():
                if not len(g):
                    continue
                closed = [i for i, (t, _k) in enumerate(g.slots) if t.closed]
                if closed:
                    owners, _ = g.remove(closed)
                    for task, _k in owners:
                        self._leave(r, task)
            m.RUNNING.labels(r.name).set(r.in_batch)
            self._cond.notify_all()

    def _reset(self, r: _Runner, reason: str) -> None:
        """After a failed tick: fail every generation with rows in the batch and empty it."""
        with self._cond:
            tasks = list(r.active.values())
            for g in r.groups.values():
                for task, _k in g.slots:
                    self._leave(r, task)
            r.groups.clear()
            r.active.clear()
            r.in_batch = 0
            r.rows = dict.fromkeys(PRIORITIES, 0)
            r.client_rows.clear()
            r.paused = 0
            m.PAUSED.labels(r.name).set(0)
            self._cond.notify_all()
        for task in tasks:
            self._close(task, error=reason)

    # ---- encode threads ----------------------------------------------------------------------

    @staticmethod
    def _encode_previews(owners: list[tuple[_Task, int, int]], pixels: torch.Tensor) -> None:
        for (task, k, nfe_done), px in zip(owners, pixels, strict=True):
            if task.closed:
                continue
            png = base64.b64encode(png_bytes(px)).decode("ascii")
            task.emit("preview", {"index": k, "nfe_done": nfe_done, "png_base64": png})

    def _encode(self, r: _Runner, task: _Task, k: int, pixels: torch.Tensor) -> None:
        try:
            png = encode_png(r.name, pixels)
        except Exception as e:
            log.exception("encoding image %d of %s failed", k, task.spec.id)
            self._close(task, error=f"PNG encoding failed: {e}")
            return
        with self._cond:
            if task.closed:
                return
            task.out.pngs[k] = png
            done = len(task.out.pngs) == task.spec.n
        if done:
            result = job_result(task.spec, task.out, str(self.device), self.worker, self.config.keep_samples)
            self._close(task, result=result)
