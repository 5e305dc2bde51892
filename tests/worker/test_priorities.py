"""Priorities and the per-client cap in the engine, end to end, in-process on the tiny models (no
Redis, no HTTP). The policy itself, case by case and without a model, is in test_scheduler.py; here
it meets real rows: paused rows resume unchanged, every image is its seed's.

What is checked is state (the engine's paused count and its gauge, the batch sizes each generation
ran in, the images), never timing: strict settings (tick_budget 1, no slack, no minimum share)
make a CPU tick pause every batch row beside interactive ones whatever the measured times."""

import threading
import time

import pytest
import torch
from prometheus_client import REGISTRY
from servicekit import one_thread, reference, wait_until

from arcdiff.contract import GenerationSpec
from arcdiff.worker.batch import SolverGroup
from arcdiff.worker.engine import Engine, EngineConfig
from arcdiff.worker.loading import Prepared
from arcdiff.worker.scheduler import REFRESH_AFTER

STRICT = {"tick_budget": 1.0, "tick_budget_min_s": 0.0, "batch_min_share": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def spec(id, steps, solver="ddpm", seed=0, n=1, priority="interactive", client=""):
    return GenerationSpec(
        id=id,
        model="tiny",
        steps=steps,
        solver=solver,
        seed=seed,
        n=n,
        submitted_at=time.time(),
        priority=priority,
        client=client,
    )


def make_engine(loaded, max_batch=8, forward=None, start=True, **config):
    lm = loaded["tiny"]
    models = {"tiny": Prepared(lm, forward or lm.denoiser)}
    eng = Engine(models, EngineConfig(max_batch=max_batch, worker="test", keep_samples=True, **config))
    return eng.start() if start else eng


def gauge(name, model="tiny"):
    return REGISTRY.get_sample_value(name, {"model": model})


def test_batch_rows_pause_for_an_interactive_image_and_resume_unchanged(loaded):
    """With batch rows running, an interactive image arrives: the batch rows sit out its ticks
    (state, step and noise stream kept), it finishes alone, they resume and end bit-identical
    to the same generation run without interruption (ddpm: a noise draw while paused would show)."""
    sizes = []
    base = loaded["tiny"].denoiser

    def forward(x, eta):
        sizes.append(x.shape[0])
        return base(x, eta)

    eng = make_engine(loaded, forward=forward, progress_interval_s=0.0, **STRICT)
    try:
        alone = eng.submit(spec("alone", 1000, seed=5, n=2, priority="batch")).result(120)
        assert alone.metrics.batch_sizes == [2]

        batch = eng.submit(spec("batch", 1000, seed=5, n=2, priority="batch"))
        seen = []  # (paused images, paused gauge) at each progress event of the interactive image

        def on_event(event, data):  # called on the engine's thread, inside the tick
            if event == "progress":
                seen.append((eng.occupancy("tiny").paused, gauge("arcdiff_worker_paused_images")))

        count = len(sizes)
        wait_until(lambda: sizes[count:].count(2) >= 3, 60, "the batch rows to run")
        inter = eng.submit(spec("inter", 20, solver="euler", seed=9), listener=on_event).result(60)
        assert not batch.done(), "the batch generation should still be running"
        assert inter.metrics.batch_sizes == [1]  # it ran alone: the two batch rows sat out
        assert seen and all(s == (2, 2.0) for s in seen), seen
        resumed = batch.result(120)
        assert resumed.metrics.batch_sizes == [2]  # never ran beside the interactive image
        assert torch.equal(resumed.extra["samples"], alone.extra["samples"])
        assert [im.png for im in resumed.images] == [im.png for im in alone.images]
        assert eng.occupancy("tiny").paused == 0 and gauge("arcdiff_worker_paused_images") == 0
    finally:
        eng.close()


def test_batch_rows_run_beside_interactive_ones_within_the_budget(loaded, model_dir):
    """A budget the batch rows fit in (as a GPU's flat cost curve gives): they run beside."""
    eng = make_engine(loaded, progress_interval_s=0.0, tick_budget=1000.0)
    try:
        batch = eng.submit(spec("batch", 1000, seed=3, n=2, priority="batch"))
        wait_until(lambda: eng.status("batch") == "running", 60, "the batch generation to start", 0.005)
        paused = []
        inter = eng.submit(
            spec("inter", 20, solver="euler", seed=9), listener=lambda e, d: paused.append(eng.occupancy("tiny").paused)
        ).result(60)
        # beside them, but alone once per REFRESH_AFTER forwards (to keep its own time current)
        assert inter.metrics.batch_sizes == [1, 3] and set(paused) == {0, 2}
        assert paused.count(2) <= 1 + len(paused) // REFRESH_AFTER, paused
        assert not batch.done()
        eng.cancel("batch")
        want, _ = reference(model_dir, "tiny", 20, "euler", 9, 1)
        assert torch.allclose(inter.extra["samples"], want, atol=1e-5)
    finally:
        eng.close()


def test_every_image_is_its_seeds_whatever_rows_the_budget_runs(loaded, model_dir):
    """Some batch rows at a time: a forward that costs in proportion to its rows (as on a CPU), a
    tight budget and a large minimum share, batch rows of several solvers filling the batch before
    interactive images arrive (so only some of them fit beside). Each image is still its seed's."""
    base = loaded["tiny"].denoiser
    ticks = []  # (rows, interactive rows, paused rows)

    def forward(x, eta):  # row by row: the cost grows with the rows
        ticks.append((x.shape[0], eng.occupancy("tiny").interactive, eng.occupancy("tiny").paused))
        outs = [base(x[i : i + 1], eta[i : i + 1]) for i in range(x.shape[0])]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    eng = make_engine(loaded, max_batch=4, forward=forward, tick_budget=1.0, tick_budget_min_s=0.0, batch_min_share=0.5)
    try:
        solvers = ("ddpm", "rk4", "dpmpp2m", "unipc3", "dpmpp2m_sde", "heun")
        batch = [spec(f"b{i}", 8, solver=s, seed=50 + 10 * i, priority="batch") for i, s in enumerate(solvers)]
        futures = [eng.submit(s) for s in batch]
        wait_until(lambda: eng.occupancy("tiny").running == 4, 60, "batch rows to fill the batch", 0.005)
        inter = [spec(f"i{k}", 30, solver="euler", seed=500 + k) for k in range(2)]
        futures += [eng.submit(s) for s in inter]
        for s, f in zip(batch + inter, futures, strict=True):
            want, _ = reference(model_dir, "tiny", s.steps, s.solver, s.seed, s.n)
            assert torch.allclose(f.result(120).extra["samples"], want, atol=1e-5), s.id
        assert any(paused and rows > n_i for rows, n_i, paused in ticks), "no tick ran only some batch rows"
    finally:
        eng.close()


def test_an_interactive_image_gets_in_beside_a_full_batch_of_batch_images(loaded, model_dir):
    eng = make_engine(loaded, max_batch=2, **STRICT)
    try:
        batch = eng.submit(spec("batch", 1000, n=2, priority="batch"))
        wait_until(lambda: eng.occupancy("tiny").running == 2, 60, "the batch images to fill the batch", 0.005)
        assert not eng.has_room("tiny", "batch") and eng.has_room("tiny", "interactive")
        inter = eng.submit(spec("inter", 4, solver="heun", seed=11)).result(60)
        assert inter.metrics.batch_sizes == [1] and not batch.done()
        want, _ = reference(model_dir, "tiny", 4, "heun", 11, 1)
        assert torch.allclose(inter.extra["samples"], want, atol=1e-5)
        # interactive images take a batch's worth at most: then a third one waits
        more = [eng.submit(spec(f"i{k}", 1000, solver="euler")) for k in range(2)]
        wait_until(lambda: eng.occupancy("tiny").interactive == 2, 60, "two interactive images", 0.005)
        assert not eng.has_room("tiny", "interactive") and eng.occupancy("tiny").running == 4
        for k in range(len(more)):
            eng.cancel(f"i{k}")
        eng.cancel("batch")
    finally:
        eng.close()


def test_interactive_images_are_admitted_before_batch_images_waiting_longer(loaded):
    gate = threading.Event()
    base = loaded["tiny"].denoiser

    def forward(x, eta):
        gate.wait(60)
        return base(x, eta)

    eng = make_engine(loaded, max_batch=2, forward=forward, start=False, **STRICT)
    try:
        futures = [
            eng.submit(spec("b1", 2, priority="batch")),
            eng.submit(spec("b2", 2, priority="batch")),
            eng.submit(spec("i1", 2)),
        ]
        eng.start()  # the first tick admits i1, then b1 (FIFO within a priority); b2 waits
        wait_until(lambda: eng.occupancy("tiny").running == 2, 30, "the first admission")
        assert [eng.status(s) for s in ("i1", "b1", "b2")] == ["running", "running", "queued"]
        gate.set()
        for f in futures:
            f.result(60)
    finally:
        gate.set()
        eng.close()


def test_per_client_cap_lets_others_go_first_and_loses_nothing(loaded, model_dir):
    """max_images_per_key 2: client a's further images wait while b's and c's take the slots, and
    take no room from the queue (a worker keeps taking jobs for others); every image is made, each
    the one its seed gives."""
    gate = threading.Event()
    base = loaded["tiny"].denoiser
    peaks: dict[str, int] = {}

    def forward(x, eta):
        gate.wait(60)
        for client, n in eng.occupancy("tiny").clients.items():
            peaks[client] = max(peaks.get(client, 0), n)
        return base(x, eta)

    eng = make_engine(loaded, max_batch=5, forward=forward, start=False, max_images_per_key=2)
    try:
        specs = [
            spec("a1", 3, solver="ddim", seed=1, n=4, client="a"),
            spec("b1", 3, solver="ddim", seed=2, n=1, client="b"),
            spec("a2", 3, solver="ddim", seed=3, n=1, client="a"),
            spec("c1", 3, solver="ddim", seed=4, n=1, client="c"),
        ]
        futures = [eng.submit(s) for s in specs]
        eng.start()
        wait_until(lambda: eng.occupancy("tiny").running == 4, 30, "the first admission")
        assert eng.occupancy("tiny").clients == {"a": 2, "b": 1, "c": 1}
        assert [eng.status(s.id) for s in specs] == ["running", "running", "queued", "running"]
        assert eng.occupancy("tiny").waiting == 3 and eng.has_room("tiny", "batch")  # the 3 held back take none
        gate.set()
        for s, f in zip(specs, futures, strict=True):
            want, _ = reference(model_dir, "tiny", 3, "ddim", s.seed, s.n)
            assert torch.allclose(f.result(60).extra["samples"], want, atol=1e-5), s.id
        assert peaks["a"] == 2 and eng.occupancy("tiny").clients == {}
    finally:
        gate.set()
        eng.close()


@pytest.mark.parametrize("solver", ["ddpm", "rk4", "dpmpp2m", "unipc3", "dpmpp2m_sde"])
def test_a_group_advancing_only_its_first_rows_leaves_the_others_as_they_were(loaded, solver):
    """Rows 0, 1, 2 get 5, 3 and 2 evaluations through partial advances; each ends as a group of
    its own given the same number of evaluations (state and noise stream)."""
    denoiser = loaded["tiny"].denoiser
    seeds = [10, 11, 12]

    def group(rows):
        g = SolverGroup(solver)
        gens = [torch.Generator().manual_seed(seeds[i]) for i in rows]
        x_T = torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(100 + i)) for i in rows])
        g.add(x_T, torch.tensor([6] * len(rows)), list(rows), gens, ["uniform"] * len(rows))
        return g

    def step(g, rows=None):
        x, eta = g.point(rows)
        x0, eps = denoiser(x, eta)
        g.advance(x0, eps, rows)

    with torch.inference_mode():
        together = group([0, 1, 2])
        for rows in (1, 1, 2, None, None):
            step(together, rows)
        for i, evaluations in enumerate((5, 3, 2)):
            alone = group([i])
            for _ in range(evaluations):
                step(alone)
            assert together.remaining[i] == alone.remaining[0]
            for key, value in alone.state.items():
                assert torch.allclose(together.state[key][i], value[0], atol=1e-6), (solver, i, key)
            if together.impl.stochastic:
                assert torch.equal(together.generators[i].get_state(), alone.generators[0].get_state())
