"""The scheduling policy without a model, a device or torch: made-up generations and made-up forward
times go in, plans come out (arcdiff/worker/scheduler.py). The engine end to end, where the same
policy meets real rows, is in test_priorities.py."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from arcdiff.contract import GenerationSpec
from arcdiff.worker.scheduler import (
    REFRESH_AFTER,
    ForwardTimes,
    Occupancy,
    Scheduler,
    SchedulerConfig,
    TickPlan,
    bucket_for,
    bucket_sizes,
)


@dataclass(eq=False)
class Gen:
    """A generation as the scheduler sees it."""

    spec: GenerationSpec

    def __repr__(self) -> str:
        return self.spec.id


def gen(id: str, n: int = 1, priority: str = "interactive", client: str = "", solver: str = "ddim") -> Gen:
    return Gen(GenerationSpec(id, "m", 10, solver, 0, n, 0.0, priority=priority, client=client))


def batch(id: str, n: int = 1, **kw) -> Gen:
    return gen(id, n, priority="batch", **kw)


def ids(images) -> list[str]:
    return [g.spec.id for g, _k in images]


def scheduler(max_batch: int = 8, **config) -> Scheduler[Gen]:
    return Scheduler(SchedulerConfig(max_batch=max_batch, **config))


def proportional(per_row: float):
    """Forward seconds in proportion to the rows (as on a CPU)."""
    return lambda rows: per_row * rows


def flat(seconds: float):
    """The same forward time for any batch (as on a GPU well below its capacity)."""
    return lambda rows: seconds


def tick(s: Scheduler[Gen], cost) -> TickPlan[Gen]:
    """One tick as the engine runs it: the plan, then the forward time its size took."""
    plan = s.schedule()
    if plan.rows:
        s.update_from_output(forward=[(plan.size, cost(plan.size))])
    return plan


def batch_rows(plan: TickPlan) -> int:
    return sum(rows for (_solver, priority), rows in plan.run if priority == "batch")


def measure(s: Scheduler[Gen], cost, sizes) -> None:
    s.update_from_output(forward=[(b, cost(b)) for b in sizes])


# ---- admission -------------------------------------------------------------------------------------

ADMISSION = [
    # (case, max_batch, cap, rounds: [(generations added, admitted by the round's schedule())], waiting after)
    ("fifo within a priority", 3, 0, [([gen("i1", 2), gen("i2", 2)], ["i1", "i1", "i2"])], ["i2"]),
    (
        "interactive first, even before batch images waiting longer",
        2,
        0,
        [([batch("b1"), batch("b2"), gen("i1")], ["i1", "b1"])],
        ["b2"],
    ),
    (
        "batch images take only the room interactive ones leave",
        3,
        0,
        [([gen("i1", 2), batch("b1", 2)], ["i1", "i1", "b1"])],
        ["b1"],
    ),
    (
        "an interactive image gets in beside a full batch of batch images",
        2,
        0,
        [([batch("b1", 2)], ["b1", "b1"]), ([gen("i1"), batch("b2")], ["i1"])],
        ["b2"],
    ),
    (
        "interactive images have a batch's worth of room, no more",
        2,
        0,
        [([batch("b1", 2)], ["b1", "b1"]), ([gen("i1"), gen("i2"), gen("i3")], ["i1", "i2"])],
        ["i3"],
    ),
    (
        "a client at its cap waits while others go first",
        5,
        2,
        [
            (
                [gen("a1", 4, client="a"), gen("b1", client="b"), gen("a2", client="a"), gen("c1", client="c")],
                ["a1", "a1", "b1", "c1"],
            )
        ],
        ["a1", "a1", "a2"],
    ),
    (
        "a capped client's slots go to its interactive images first",
        4,
        1,
        [([batch("ab", client="a"), gen("ai", client="a"), batch("bb", client="b")], ["ai", "bb"])],
        ["ab"],
    ),
    (
        "no cap: one client may fill the batch",
        3,
        0,
        [([gen("a1", 2, client="a"), gen("a2", 2, client="a")], ["a1", "a1", "a2"])],
        ["a2"],
    ),
]


@pytest.mark.parametrize("case, max_batch, cap, rounds, waiting", ADMISSION, ids=[c[0] for c in ADMISSION])
def test_admission(case, max_batch, cap, rounds, waiting):
    s = scheduler(max_batch, max_images_per_key=cap)
    for added, admitted in rounds:
        for g in added:
            s.add(g)
        assert ids(s.schedule().admitted) == admitted, case
    assert ids(s.waiting["interactive"]) + ids(s.waiting["batch"]) == waiting, case


def test_admitted_images_form_groups_by_solver_and_priority_in_admission_order():
    s = scheduler(8)
    for g in (batch("b", 2, solver="euler"), gen("i", 1, solver="ddim"), gen("j", 1, solver="euler")):
        s.add(g)
    plan = s.schedule()
    assert [(g.spec.id, k) for g, k in plan.admitted] == [("i", 0), ("j", 0), ("b", 0), ("b", 1)]
    assert s.groups == {("ddim", "interactive"): 1, ("euler", "interactive"): 1, ("euler", "batch"): 2}
    # nothing measured yet: the interactive rows run alone once, the batch rows wait
    assert plan.run == [(("ddim", "interactive"), 1), (("euler", "interactive"), 1)]
    assert (plan.rows, plan.size, plan.paused) == (2, 2, 2)
    s.update_from_output(forward=[(2, 0.01), (4, 0.01)])  # a flat cost: the batch rows join
    assert s.schedule().run == [(("ddim", "interactive"), 1), (("euler", "interactive"), 1), (("euler", "batch"), 2)]


def test_rows_that_leave_free_their_slots_and_clients():
    s = scheduler(2, max_images_per_key=1)
    a, b, c = gen("a", client="x"), gen("b", client="x"), gen("c", client="y")
    for g in (a, b, c):
        s.add(g)
    assert ids(s.schedule().admitted) == ["a", "c"]
    assert dict(s.client_rows) == {"x": 1, "y": 1} and s.running() == 2
    s.update_from_output(left=[(("ddim", "interactive"), [(a, 0)])])
    assert dict(s.client_rows) == {"y": 1} and s.running() == 1 and s.groups[("ddim", "interactive")] == 1
    assert s.occupancy() == Occupancy(waiting=1, running=1, interactive=1, paused=0, clients={"y": 1})
    assert ids(s.schedule().admitted) == ["b"]
    assert s.occupancy() == Occupancy(waiting=0, running=2, interactive=2, paused=0, clients={"x": 1, "y": 1})


def test_a_discarded_generation_leaves_the_queue_and_others_keep_their_order():
    s = scheduler(1)
    gens = [batch("b1", 2), batch("b2"), batch("b3")]
    for g in gens:
        s.add(g)
    s.discard(gens[1])
    assert ids(s.waiting["batch"]) == ["b1", "b1", "b3"]
    assert s.n_waiting() == 3 and s.has_work()


def test_reset_empties_the_batch_but_keeps_the_queue():
    s = scheduler(1)
    s.add(gen("i", 2))
    s.schedule()
    s.reset()
    assert (s.running(), s.groups, dict(s.client_rows), s.paused) == (0, {}, {}, 0)
    assert ids(s.schedule().admitted) == ["i"]


# ---- room: whether a worker should take another job ------------------------------------------------

ROOM = [
    # (case, max_batch, cap, generations in order, schedule() first?, room for interactive, room for batch)
    ("empty", 2, 0, [], False, True, True),
    ("a full batch of batch images leaves interactive room", 2, 0, [batch("b", 2)], True, True, False),
    ("batch images waiting count against batch room", 2, 0, [batch("b", 2)], False, True, False),
    ("a batch's worth of interactive images: no more room", 2, 0, [gen("i", 2)], True, False, False),
    ("interactive waiting count against interactive room", 2, 0, [gen("i", 2)], False, False, False),
    (
        "images the cap holds back take no room",
        5,
        2,
        [gen("a1", 4, client="a"), gen("b1", client="b"), gen("a2", client="a"), gen("c1", client="c")],
        True,
        True,
        True,
    ),
    ("a batch's worth held back by the cap: no room at all", 2, 1, [gen("a", 3, client="a")], True, False, False),
]


@pytest.mark.parametrize("case, max_batch, cap, gens, scheduled, interactive, batch_", ROOM, ids=[c[0] for c in ROOM])
def test_room(case, max_batch, cap, gens, scheduled, interactive, batch_):
    s = scheduler(max_batch, max_images_per_key=cap)
    for g in gens:
        s.add(g)
    if scheduled:
        s.schedule()
    assert (s.has_room("interactive"), s.has_room("batch")) == (interactive, batch_), case


# ---- the tick budget: which batch rows run beside interactive ones ---------------------------------

BUDGET = [
    # (case, config, forward cost, interactive rows, batch rows, batch rows that run)
    ("strict priority pauses every batch row", {"tick_budget": 1.0, "tick_budget_min_s": 0.0}, flat(0.01), 1, 3, 0),
    ("a flat cost curve (a GPU) runs them all", {"tick_budget": 1.2}, flat(0.01), 1, 3, 3),
    ("a proportional cost (a CPU): as many as 30% allows", {"tick_budget": 1.3}, proportional(0.01), 5, 3, 1),
    ("a proportional cost, 60% over: two rows beside four", {"tick_budget": 1.6}, proportional(0.01), 4, 3, 2),
    ("the minimum slack admits rows that cost little", {"tick_budget_min_s": 0.001}, proportional(0.0002), 1, 3, 3),
    ("no more than max_batch rows in one forward", {"tick_budget": 100.0}, flat(0.01), 6, 5, 2),
    ("unpadded, one row fits in 60% beside two", {"tick_budget": 1.6}, proportional(0.01), 2, 3, 1),
    ("padded to 4, it does not", {"tick_budget": 1.6, "pad": True}, proportional(0.01), 2, 3, 0),
]


@pytest.mark.parametrize("case, config, cost, n_i, n_b, ran", BUDGET, ids=[c[0] for c in BUDGET])
def test_tick_budget(case, config, cost, n_i, n_b, ran):
    config = {"tick_budget_min_s": 0.0, "batch_min_share": 0.0, **config}
    s = scheduler(8, **config)
    s.add(batch("b", n_b))
    assert batch_rows(s.schedule()) == n_b  # alone, every batch row runs
    measure(s, cost, range(1, 9))
    s.add(gen("i", n_i))
    plan = s.schedule()
    assert [rows for (_s, p), rows in plan.run if p == "interactive"] == [n_i], case
    assert (batch_rows(plan), plan.paused, s.paused) == (ran, n_b - ran, n_b - ran), case


def test_before_any_measurement_interactive_rows_run_alone():
    s = scheduler(8, tick_budget=100.0)
    s.add(batch("b", 2))
    s.add(gen("i"))
    plan = s.schedule()
    assert (batch_rows(plan), plan.paused) == (0, 2)
    s.update_from_output(forward=[(plan.size, 0.01)])
    assert (batch_rows(s.schedule()), s.paused) == (2, 0)


def test_interactive_rows_run_alone_once_per_refresh_to_keep_their_own_time_current():
    """Their own time goes stale once more than REFRESH_AFTER other forwards were measured since:
    then they run alone once (batch rows paused) to measure it again."""
    s = scheduler(8, tick_budget=100.0)
    s.add(batch("b", 2))
    s.add(gen("i"))
    alone = [batch_rows(tick(s, flat(0.01))) == 0 for _ in range(3 * (REFRESH_AFTER + 2) + 1)]
    starts = [t for t, a in enumerate(alone) if a]
    assert starts == [0, 18, 36, 54] and REFRESH_AFTER == 16, starts  # first: nothing measured yet


def test_paused_rows_resume_when_the_interactive_images_leave():
    s = scheduler(8, tick_budget=1.0, tick_budget_min_s=0.0, batch_min_share=0.0)
    b, i = batch("b", 3), gen("i", 2)
    s.add(b)
    tick(s, proportional(0.01))
    s.add(i)
    assert [batch_rows(tick(s, proportional(0.01))) for _ in range(3)] == [0, 0, 0] and s.paused == 3
    s.update_from_output(left=[(("ddim", "interactive"), [(i, 0), (i, 1)])])
    plan = tick(s, proportional(0.01))
    assert (plan.run, plan.paused, s.credit) == ([(("ddim", "batch"), 3)], 0, 0.0)


# ---- the minimum share: paused rows are owed forward time ------------------------------------------

SHARE = [
    # (batch_min_share, batch rows that run beside one interactive row, tick by tick; cost 10 ms a row)
    (0.0, [0, 0, 0, 0, 0, 0, 0, 0]),
    (0.3, [0, 0, 0, 0, 1, 0, 0, 1]),
    (0.55, [0, 0, 1, 0, 1, 0, 1, 0]),
    (1.1, [0, 1, 1, 1, 1, 1, 1, 1]),
    (2.1, [0, 2, 2, 2, 2, 2, 2, 2]),
]


@pytest.mark.parametrize("share, ran", SHARE, ids=[f"share {c[0]}" for c in SHARE])
def test_paused_rows_get_the_minimum_share(share, ran):
    """With a strict budget the batch rows run only on credit, share x the interactive row's own
    time per tick: over a run, about share x as much forward time as the interactive row."""
    s = scheduler(8, tick_budget=1.0, tick_budget_min_s=0.0, batch_min_share=share)
    s.add(batch("b", 4))
    tick(s, proportional(0.01))
    s.add(gen("i"))
    measure(s, proportional(0.01), [1])
    assert [batch_rows(tick(s, proportional(0.01))) for _ in ran] == ran


# ---- turns: which batch group's rows run when only some do -----------------------------------------


def test_batch_groups_take_turns_at_the_rows_that_run():
    s = scheduler(8, tick_budget=1.0, tick_budget_min_s=0.0, batch_min_share=1.1)
    s.add(batch("e", 2, solver="euler"))
    s.add(batch("d", 2, solver="ddim"))
    tick(s, proportional(0.01))
    s.add(gen("i"))
    measure(s, proportional(0.01), [1])
    runs = [[k for k, _rows in tick(s, proportional(0.01)).run if k[1] == "batch"] for _ in range(5)]
    e, d = ("euler", "batch"), ("ddim", "batch")
    assert runs == [[], [e], [d], [e], [d]], runs  # one row a tick on credit, the groups alternating


# ---- the padded size the network sees --------------------------------------------------------------

SIZES = [
    # (pad, buckets, rows -> size)
    (False, (), {1: 1, 3: 3, 5: 5, 8: 8}),
    (True, (), {1: 1, 3: 4, 5: 8, 8: 8}),
    (True, (8,), {1: 8, 3: 8, 8: 8}),
    (True, (2, 8), {1: 2, 3: 8}),
]


@pytest.mark.parametrize("pad, buckets, sizes", SIZES)
def test_plan_size(pad, buckets, sizes):
    for rows, size in sizes.items():
        s = scheduler(8, pad=pad, buckets=buckets)
        s.add(gen("i", rows))
        plan = s.schedule()
        assert (plan.rows, plan.size) == (rows, size)


def test_buckets():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(n, bucket_sizes(12)) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    with pytest.raises(ValueError):
        bucket_for(13, bucket_sizes(12))


BAD_CONFIGS = [
    {"max_batch": 0},
    {"tick_budget": 0.9},
    {"tick_budget_min_s": -1.0},
    {"batch_min_share": -0.1},
    {"max_images_per_key": -1},
    {"max_batch": 8, "buckets": (1, 4)},
    {"max_batch": 8, "buckets": (0, 8)},
]


@pytest.mark.parametrize("config", BAD_CONFIGS, ids=str)
def test_config_is_checked(config):
    with pytest.raises(ValueError):
        SchedulerConfig(**config)


# ---- the forward-time estimate ---------------------------------------------------------------------

ESTIMATES = [
    # (case, measurements (rows, seconds) in order, rows -> predicted seconds)
    ("nothing measured", [], {4: None}),
    ("in proportion from one size", [(2, 0.010)], {4: 0.020, 1: 0.005, 2: 0.010}),
    ("interpolated between sizes", [(2, 0.010), (8, 0.020)], {5: 0.015, 16: 0.040}),
    ("a spike: the median of the last 3 ignores it", [(8, 0.020), (8, 0.900), (8, 0.030)], {8: 0.030, 16: 0.060}),
    ("old measurements leave the window", [(8, 0.9), (8, 0.9), (8, 0.01), (8, 0.01), (8, 0.01)], {8: 0.01}),
    ("a bad measurement is ignored", [(0, 0.5), (4, float("nan")), (4, -1.0), (4, 0.04)], {4: 0.04, 2: 0.02}),
]


@pytest.mark.parametrize("case, measurements, predictions", ESTIMATES, ids=[c[0] for c in ESTIMATES])
def test_forward_time_estimate(case, measurements, predictions):
    t = ForwardTimes(window=3)
    for rows, seconds in measurements:
        t.add(rows, seconds)
    for rows, want in predictions.items():
        assert t.predict(rows) == (None if want is None else pytest.approx(want)), (case, rows)


def test_forward_time_staleness():
    t = ForwardTimes()
    for rows in (2, 4, 4, 4):
        t.add(rows, 0.01)
    assert not t.stale(2, after=3) and t.stale(2, after=2)  # 2: measured 3 measurements ago
    assert not t.stale(4, after=0) and t.stale(5, after=100)  # 5: never


def test_the_scheduler_imports_no_torch():
    code = "import sys, arcdiff.worker.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
