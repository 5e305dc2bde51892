"""The engine's scheduling policy, apart from its execution (as vLLM's scheduler is apart from its
model runner): which images wait, which enter the batch, which of the batch's rows run each tick.

One Scheduler per model. Each tick the engine asks it for a plan (`schedule`), carries the plan
out on the device, and reports back what happened (`update_from_output`: the rows that left the
batch, the forward times measured). The policy:

- admission: waiting images enter the batch interactive ones first, FIFO within a priority:
  interactive images up to max_batch of them, batch images while the whole batch holds fewer than
  max_batch (so an interactive image gets in beside a full batch of batch images). A client at its
  cap (max_images_per_key images in the batch) waits while others go first;
- the rows that run: with no interactive rows, all of them. With interactive rows, all of those,
  and batch rows only while the tick's predicted forward time stays within the tick budget (see
  `_batch_rows`; predictions from the forward times measured per batch size): on a GPU a larger
  batch costs little more and batch rows keep running, on a CPU they pause (the executor leaves
  their state and noise streams untouched) and resume when the interactive images are done.
  Paused rows are owed a minimum share of forward time, so a constant interactive stream cannot
  starve them;
- the padded size: a compiled network runs the batch padded to a bucket (1, 2, 4, ..., max_batch),
  so it sees few shapes; an eager one the exact batch (on a CPU a padded row costs as much as a
  real one).

Rows live in solver groups, one per (solver, priority), in the order the groups formed; a plan
runs the first rows of each group it names (the executor keeps a group's rows in admission order).
Nothing here knows about tensors or devices: it imports no torch, and its tests feed it made-up
requests and timings (tests/worker/test_scheduler.py). Not thread-safe: the engine calls it under
its lock.
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from arcdiff.contract import PRIORITIES, GenerationSpec

# while batch rows run beside interactive ones, the interactive rows run alone at least once per this
# many forwards, so that their own forward time, against which the budget is set, stays current
REFRESH_AFTER = 16

GroupKey = tuple[str, str]  # a solver group: (solver, priority)


class Request(Protocol):
    """What the scheduler needs of a generation: its spec (n, priority, client, solver)."""

    @property
    def spec(self) -> GenerationSpec: ...


R = TypeVar("R", bound=Request)


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (and max_batch itself): the shapes the network ever sees."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket that holds n images."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} images exceed the largest bucket {sizes[-1]}")


@dataclass(frozen=True)
class SchedulerConfig:
    """The policy's settings (see EngineConfig, which they come from).

    `pad`: the network runs batches padded to `buckets` (a compiled one); otherwise the exact batch.
    `tick_budget`, `tick_budget_min_s`: while interactive rows run, a tick's forward may take
    tick_budget x their own predicted time, and at least tick_budget_min_s more than it.
    `batch_min_share`: paused batch rows still get at least this much forward time, as a fraction
    of the interactive rows' own (0: none).
    `max_images_per_key`: images of one client (spec.client) in the batch at once; 0: no cap."""

    max_batch: int = 32
    buckets: tuple[int, ...] = ()  # default: bucket_sizes(max_batch)
    pad: bool = False
    tick_budget: float = 1.2
    tick_budget_min_s: float = 0.001
    batch_min_share: float = 0.05
    max_images_per_key: int = 0

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


@dataclass
class TickPlan(Generic[R]):
    """One tick's decisions, in the order the executor carries them out."""

    # images that enter the batch now, (generation, image index) in admission order: each joins
    # the end of its group (spec.solver, spec.priority)
    admitted: list[tuple[R, int]] = field(default_factory=list)
    # the rows that run: (group, how many of its first rows), in the order they are gathered
    run: list[tuple[GroupKey, int]] = field(default_factory=list)
    rows: int = 0  # images evaluated (the sum over `run`)
    size: int = 0  # rows the network runs: `rows`, padded to a bucket when the config pads
    paused: int = 0  # batch rows in the batch that sit this tick out


@dataclass(frozen=True)
class Occupancy:
    """One model's queue and batch at an instant, for diagnostics and tests."""

    waiting: int  # images not yet admitted
    running: int  # images in the batch, running or paused
    interactive: int  # of those, interactive ones
    paused: int  # batch rows that sat out the last tick
    clients: dict[str, int]  # images in the batch per client (spec.client)


class ForwardTimes:
    """A running estimate of the network's forward time per batch size (rows the network ran,
    padded), from the engine's own measurements: per size the median of its last few (robust to
    the spikes of a shared machine, where another process takes the core mid-forward), linear
    interpolation between measured sizes, and in proportion to the rows beyond the largest one (as a
    CPU costs; a GPU's flatter curve is learned once larger batches have run)."""

    def __init__(self, window: int = 9):
        self.window = window  # measurements kept per size
        self.sizes: list[int] = []  # measured sizes, sorted
        self.recent: dict[int, deque[float]] = {}
        self.seconds: dict[int, float] = {}  # the median of each size's recent measurements
        self.count = 0  # measurements taken
        self.last: dict[int, int] = {}  # per size: self.count at its latest measurement

    def add(self, rows: int, seconds: float) -> None:
        if rows < 1 or not seconds >= 0:
            return
        recent = self.recent.get(rows)
        if recent is None:
            bisect.insort(self.sizes, rows)
            recent = self.recent[rows] = deque(maxlen=self.window)
        recent.append(seconds)
        self.seconds[rows] = statistics.median(recent)
        self.count += 1
        self.last[rows] = self.count

    def stale(self, rows: int, after: int) -> bool:
        """Whether `rows` has not been measured in the last `after` measurements (of any size)."""
        return self.count - self.last.get(rows, -after - 1) > after

    def predict(self, rows: int) -> float | None:
        """Seconds a forward of `rows` rows is expected to take; None before any measurement."""
        if rows in self.seconds:
            return self.seconds[rows]
        if not self.sizes:
            return None
        i = bisect.bisect_left(self.sizes, rows)
        if i == len(self.sizes):  # beyond the largest measured size
            lo = self.sizes[-1]
            return self.seconds[lo] * rows / lo
        hi = self.sizes[i]
        if i == 0:  # below the smallest: in proportion, down to nothing
            return self.seconds[hi] * rows / hi
        lo = self.sizes[i - 1]
        t_lo, t_hi = self.seconds[lo], self.seconds[hi]
        return t_lo + (t_hi - t_lo) * (rows - lo) / (hi - lo)


class Scheduler(Generic[R]):
    """The policy of one model's batch: its waiting images, its rows in the batch per group,
    priority and client, and the forward times it plans with."""

    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        self.config = config
        self.buckets = config.bucket_sizes
        # (generation, image index), FIFO per priority
        self.waiting: dict[str, deque[tuple[R, int]]] = {p: deque() for p in PRIORITIES}
        self.groups: dict[GroupKey, int] = {}  # rows in the batch per group, in the order the groups formed
        self.rows: dict[str, int] = dict.fromkeys(PRIORITIES, 0)  # rows in the batch per priority
        self.client_rows: Counter[str] = Counter()  # rows in the batch per client
        self.times = ForwardTimes()  # measured forward seconds per batch size
        self.credit = 0.0  # seconds of forward time owed to paused batch rows (batch_min_share)
        self.paused = 0  # batch rows that sat out the last tick
        self.turn = 0  # which batch group goes first when only some batch rows run

    # ---- the queue and what it holds ----------------------------------------------------------

    def add(self, request: R) -> None:
        """A generation's images wait, after those of its priority already waiting."""
        self.waiting[request.spec.priority].extend((request, k) for k in range(request.spec.n))

    def discard(self, request: R) -> None:
        """A generation's images still waiting leave the queue (it was closed)."""
        p = request.spec.priority
        self.waiting[p] = deque(item for item in self.waiting[p] if item[0] is not request)

    def n_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def running(self, priority: str | None = None) -> int:
        """Rows in the batch (running or paused), of one priority or all."""
        return sum(self.rows.values()) if priority is None else self.rows[priority]

    def occupancy(self) -> Occupancy:
        rows = (self.n_waiting(), self.running(), self.running("interactive"), self.paused)
        return Occupancy(*rows, dict(self.client_rows))

    def has_work(self) -> bool:
        return any(self.waiting.values()) or any(self.rows.values())

    def has_room(self, priority: str) -> bool:
        """Whether a generation of `priority` taken now would not just sit behind a full batch.

        Interactive images have a batch's worth of room of their own (batch rows pause for them),
        batch images the room that all images leave. Images the per-client cap holds back do not
        take room (others go first), up to a batch's worth of them."""
        blocked = self._blocked()
        if blocked >= self.config.max_batch:
            return False
        if priority == "batch":
            return self.n_waiting() - blocked + self.running() < self.config.max_batch
        held = len(self.waiting["interactive"]) - self._blocked("interactive") + self.rows["interactive"]
        return held < self.config.max_batch

    def _blocked(self, priority: str | None = None) -> int:
        """Waiting images (of `priority`, or all) that the per-client cap holds back now."""
        cap = self.config.max_images_per_key
        if not cap:
            return 0
        # a client's free slots go to its interactive images first, as in _admit
        free = {c: max(0, cap - n) for c, n in self.client_rows.items()}
        blocked = 0
        for p in PRIORITIES:
            for request, _k in self.waiting[p]:
                c = request.spec.client
                left = free.get(c, cap)
                if left:
                    free[c] = left - 1
                elif priority in (None, p):
                    blocked += 1
        return blocked

    # ---- the tick -------------------------------------------------------------------------------

    def schedule(self) -> TickPlan[R]:
        """Admit waiting images, then choose the rows that run this tick."""
        plan: TickPlan[R] = TickPlan(admitted=self._admit())
        plan.run = self._select()
        plan.rows = sum(rows for _key, rows in plan.run)
        plan.size = self.size(plan.rows) if plan.rows else 0
        plan.paused = self.paused
        return plan

    def update_from_output(
        self,
        *,
        left: Iterable[tuple[GroupKey, Sequence[tuple[R, int]]]] = (),
        forward: Iterable[tuple[int, float]] = (),
    ) -> None:
        """What the executor reports: rows that left the batch, per group (finished or dropped:
        their slots are free from the next plan on), and forward times measured, (rows the
        network ran, seconds)."""
        for key, images in left:
            self.groups[key] -= len(images)
            self.rows[key[1]] -= len(images)
            for request, _k in images:
                client = request.spec.client
                self.client_rows[client] -= 1
                if self.client_rows[client] <= 0:
                    del self.client_rows[client]
        for rows, seconds in forward:
            self.times.add(rows, seconds)

    def reset(self) -> None:
        """The batch was emptied (a failed tick): no rows, no groups."""
        self.groups.clear()
        self.rows = dict.fromkeys(PRIORITIES, 0)
        self.client_rows.clear()
        self.paused = 0

    def size(self, rows: int) -> int:
        """The rows the network runs for `rows` images (padded to a bucket when the config pads)."""
        return bucket_for(rows, self.buckets) if self.config.pad else rows

    def _admit(self) -> list[tuple[R, int]]:
        picked: list[tuple[R, int]] = []
        cap = self.config.max_images_per_key
        for priority in PRIORITIES:  # interactive first: batch room is what it leaves
            q = self.waiting[priority]
            room = self.config.max_batch - self.running("interactive" if priority == "interactive" else None)
            kept: deque[tuple[R, int]] = deque()
            while room > 0 and q:
                item = q.popleft()
                spec = item[0].spec
                if cap and self.client_rows[spec.client] >= cap:
                    kept.append(item)  # its client is at the cap: others go first
                    continue
                key = (spec.solver, spec.priority)
                self.groups[key] = self.groups.get(key, 0) + 1
                self.rows[spec.priority] += 1
                self.client_rows[spec.client] += 1
                picked.append(item)
                room -= 1
            if kept:
                kept.extend(q)
                self.waiting[priority] = kept
        return picked

    def _select(self) -> list[tuple[GroupKey, int]]:
        """The rows that run this tick: (group, its first rows). Every interactive row; batch rows
        as _batch_rows allows, the oldest first, the group that goes first taking turns."""
        interactive = [(key, n) for key, n in self.groups.items() if key[1] == "interactive" and n]
        batch = [(key, n) for key, n in self.groups.items() if key[1] == "batch" and n]
        n_i, n_b = sum(n for _k, n in interactive), sum(n for _k, n in batch)
        if n_i:
            k = self._batch_rows(n_i, n_b) if n_b else 0
        else:
            k, self.credit = n_b, 0.0
        self.paused = n_b - k
        if k == n_b:
            return interactive + batch
        parts = list(interactive)
        self.turn = (self.turn + 1) % len(batch)
        for key, n in batch[self.turn :] + batch[: self.turn]:
            if k <= 0:
                break
            parts.append((key, min(k, n)))
            k -= n
        return parts

    def _batch_rows(self, n_i: int, n_b: int) -> int:
        """How many of the n_b batch rows run beside n_i interactive ones this tick.

        The tick's predicted forward time may exceed that of the interactive rows alone (t_i) by
        max((tick_budget - 1) t_i, tick_budget_min_s), plus the credit that batch_min_share lends
        paused rows (share x t_i per tick while some are paused). The forward never exceeds
        max_batch rows. Before anything was measured the interactive rows run alone once."""
        cfg = self.config
        fit = min(n_b, cfg.max_batch - n_i)
        t_i = self.times.predict(self.size(n_i))
        if fit <= 0 or t_i is None:
            return 0
        free = max((cfg.tick_budget - 1.0) * t_i, cfg.tick_budget_min_s)
        allowed = free + self.credit

        def extra(k: int) -> float:
            return (self.times.predict(self.size(n_i + k)) or 0.0) - t_i

        # the largest k whose extra time is allowed (predictions grow with rows); none when nothing
        # is allowed (strict priority: not even a row that measured "free"), nor when the
        # interactive rows' own time has not been measured lately: they run alone once to refresh
        # it (on a shared machine forward times drift, and a stale t_i would move the budget)
        fresh = not self.times.stale(self.size(n_i), REFRESH_AFTER)
        lo, hi = 0, fit if allowed > 0 and fresh else 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if extra(mid) <= allowed:
                lo = mid
            else:
                hi = mid - 1
        if lo == n_b:
            self.credit = 0.0
        else:
            spent = max(0.0, extra(lo) - free) if lo else 0.0
            self.credit = min(max(0.0, self.credit - spent) + cfg.batch_min_share * t_i, max(0.0, extra(fit)))
        return lo
