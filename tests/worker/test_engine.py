"""The continuous-batching engine in-process, on real tiny models (no Redis, no HTTP)."""

import threading
import time

import numpy as np
import pytest
import torch
from servicekit import one_thread, png_info, png_pixels, reference

from arcdiff.contract import GenerationSpec
from arcdiff.model.solvers import GRIDS, SOLVERS
from arcdiff.worker.engine import Engine, EngineConfig, GenerationFailed
from arcdiff.worker.loading import Prepared


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def spec(id, steps=4, solver="ddim", seed=0, n=1, model="tiny", schedule="uniform"):
    return GenerationSpec(
        id=id, model=model, steps=steps, solver=solver, seed=seed, n=n, submitted_at=time.time(), schedule=schedule
    )


def make_engine(loaded, start=True, max_batch=8, forwards=None, warm_up=False):
    models = {name: Prepared(lm, (forwards or {}).get(name, lm.denoiser)) for name, lm in loaded.items()}
    eng = Engine(models, EngineConfig(max_batch=max_batch, worker="test", keep_samples=True, warm_up=warm_up))
    return eng.start() if start else eng


def test_every_solver_matches_the_reference_sampler(loaded, model_dir):
    """All solvers and time grids at once in one batch (mixed steps too), each image as
    model.solvers.sample gives it."""
    eng = make_engine(loaded, max_batch=32)
    try:
        specs = [
            spec(f"s{i}", steps=2 + i % 5, solver=s, seed=100 * i, n=1, schedule=GRIDS[i % 3])
            for i, s in enumerate(SOLVERS * 3)
        ]
        specs.append(spec("eps", steps=3, solver="heun", seed=5, n=2, model="tiny-eps"))
        futures = [eng.submit(s) for s in specs]
        for s, fut in zip(specs, futures, strict=True):
            res = fut.result(120)
            want, want_px = reference(model_dir, s.model, s.steps, s.solver, s.seed, s.n, s.schedule)
            got = res.extra["samples"]
            assert torch.allclose(got, want, atol=1e-5), (
                f"{s.solver} {s.schedule}: max diff {(got - want).abs().max():.2e}"
            )
            assert res.nfe == {"euler": 1, "heun": 2, "rk4": 4}.get(s.solver, 1) * s.steps
            for k, im in enumerate(res.images):
                assert (im.index, im.seed) == (k, s.seed + k)
                assert png_info(im.png) == ("PNG:L", (8, 8))
                assert np.abs(png_pixels(im.png).astype(int) - want_px[k].astype(int)).max() <= 1
    finally:
        eng.close()


def test_same_seed_same_image_whatever_the_batch(loaded):
    """An image depends only on its seed: alone, in a crowd, or as image k of a larger request."""
    eng = make_engine(loaded, max_batch=8)
    try:
        alone = eng.submit(spec("alone", steps=6, solver="ddpm", seed=42, n=3)).result(60)
        crowd = [eng.submit(spec(f"c{i}", steps=3 + i, solver="ddpm", seed=1000 + i, n=2)) for i in range(3)]
        again = eng.submit(spec("again", steps=6, solver="ddpm", seed=42, n=3))
        shifted = eng.submit(spec("shifted", steps=6, solver="ddpm", seed=44, n=1))
        for f in crowd:
            f.result(60)
        again, shifted = again.result(60), shifted.result(60)
        assert again.metrics.batch_sizes != alone.metrics.batch_sizes  # really ran in a different batch
        a, b = alone.extra["samples"], again.extra["samples"]
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(a[2], shifted.extra["samples"][0], atol=1e-5)  # image 2 of seed 42 = seed 44
        assert (a[0] - a[1]).abs().max() > 0.1  # different index, different image
    finally:
        eng.close()


def test_short_request_finishes_while_long_one_runs(loaded):
    eng = make_engine(loaded, max_batch=8)
    try:
        long = eng.submit(spec("long", steps=400, solver="rk4", n=2))
        wait = time.monotonic() + 30
        while eng.status("long") != "running" and time.monotonic() < wait:
            time.sleep(0.01)
        short = eng.submit(spec("short", steps=2, solver="euler", n=1)).result(60)
        assert not long.done(), "the short request waited for the long one"
        assert short.metrics.batch_sizes == [3]  # it shared the long one's batch
        eng.fail("long", "test is done with it")
        with pytest.raises(GenerationFailed, match="test is done"):
            long.result(10)
    finally:
        eng.close()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-exact", "compiled-buckets"])
def test_batch_sizes_show_shared_batches_and_only_a_compiled_forward_sees_padding(loaded, compiled):
    """A compiled network (warmed up per bucket) gets batches padded to the buckets; an eager one
    the exact batch, since padded rows cost as much as real ones."""
    shapes = []
    base = loaded["tiny"].denoiser

    def forward(x, eta):
        shapes.append(x.shape[0])
        return base(x, eta)

    eng = make_engine(loaded, start=False, max_batch=8, forwards={"tiny": forward}, warm_up=compiled)
    try:
        futs = [eng.submit(spec("a", steps=5, n=3)), eng.submit(spec("b", steps=2, n=2))]
        eng.start()
        a, b = (f.result(60) for f in futs)
        assert b.metrics.batch_sizes == [5]
        assert a.metrics.batch_sizes == [3, 5]
        ticks = shapes[len(eng.buckets) :] if compiled else shapes  # after the warm-up's one call per bucket
        assert sorted(set(ticks)) == ([4, 8] if compiled else [3, 5]), shapes  # 5 -> 8, 3 -> 4
    finally:
        eng.close()


def test_non_finite_sample_fails_its_job_not_the_batch(loaded, model_dir):
    """Fault injection around the real model: row 0 (job 'bad') turns NaN at the third evaluation."""
    base = loaded["tiny"].denoiser
    calls = {"n": 0}

    def forward(x, eta):
        x0, eps = base(x, eta)
        calls["n"] += 1
        if calls["n"] == 3:
            x0 = x0.clone()
            x0[0] = float("nan")
        return x0, eps

    eng = make_engine(loaded, start=False, max_batch=8, forwards={"tiny": forward})
    try:
        bad = eng.submit(spec("bad", steps=5, solver="ddim", seed=1, n=2))
        good = eng.submit(spec("good", steps=5, solver="ddim", seed=9, n=2))
        eng.start()
        with pytest.raises(GenerationFailed, match="non-finite"):
            bad.result(60)
        res = good.result(60)
        want, _ = reference(model_dir, "tiny", 5, "ddim", 9, 2)
        assert torch.allclose(res.extra["samples"], want, atol=1e-5)
        assert eng.held() == 0 and eng.occupancy("tiny").running == 0
    finally:
        eng.close()


def test_timeout_fails_the_job(loaded):
    eng = make_engine(loaded, max_batch=2)
    try:
        fut = eng.submit(spec("slow", steps=1000, solver="rk4", n=1), timeout_s=0.3)
        with pytest.raises(GenerationFailed, match="timed out"):
            fut.result(30)
    finally:
        eng.close()


def test_take_back_unstarted_and_running(loaded):
    """What a stopping worker does: unstarted jobs come back at once, running ones on take_all."""
    eng = make_engine(loaded, max_batch=2)
    try:
        running = eng.submit(spec("run", steps=1000, solver="rk4", n=2))
        queued = eng.submit(spec("wait", steps=2, n=1))
        deadline = time.monotonic() + 30
        while eng.status("run") != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.status("wait") == "queued" and not eng.has_room("tiny")
        assert [s.id for s in eng.take_unstarted()] == ["wait"]
        assert queued.cancelled()
        assert [s.id for s in eng.take_all()] == ["run"]
        assert running.cancelled()
        assert eng.wait_idle(5)
        deadline = time.monotonic() + 10
        while eng.occupancy("tiny").running and time.monotonic() < deadline:  # rows dropped at the next tick
            time.sleep(0.01)
        assert eng.occupancy("tiny").running == 0 and eng.has_room("tiny")
    finally:
        eng.close()


def test_many_concurrent_submitters(loaded):
    """Submissions from several threads while the batch runs: every job completes exactly once."""
    eng = make_engine(loaded, max_batch=4)
    results = {}
    try:

        def submit(i):
            results[i] = eng.submit(
                spec(f"t{i}", steps=1 + i % 4, solver=SOLVERS[i % len(SOLVERS)], seed=i, n=1 + i % 3)
            )

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, fut in results.items():
            assert len(fut.result(120).images) == 1 + i % 3
        assert eng.held() == 0
    finally:
        eng.close()


def test_request_larger_than_the_batch(loaded, model_dir):
    """n > max_batch: images enter as slots free up; every one still matches its seed."""
    eng = make_engine(loaded, max_batch=2)
    try:
        res = eng.submit(spec("big", steps=3, solver="heun", seed=77, n=5)).result(60)
        want, _ = reference(model_dir, "tiny", 3, "heun", 77, 5)
        assert torch.allclose(res.extra["samples"], want, atol=1e-5)
        assert max(res.metrics.batch_sizes) == 2 and [im.seed for im in res.images] == [77, 78, 79, 80, 81]
    finally:
        eng.close()


def test_device_thread_runs_everything_on_one_thread_and_passes_errors_back():
    from arcdiff.worker.device_thread import DeviceThread

    dt = DeviceThread("t")
    try:
        names = {dt.call(lambda: threading.current_thread().name) for _ in range(3)}
        assert names == {dt.name} and dt.name != threading.current_thread().name
        with pytest.raises(ZeroDivisionError):
            dt.call(lambda: 1 / 0)
        assert dt.call(sum, [1, 2, 3]) == 6  # still serving after an error
    finally:
        dt.shutdown()


def test_engine_ticks_on_the_device_thread_it_was_given(loaded):
    from arcdiff.worker.device_thread import DeviceThread

    dt = DeviceThread("given")
    seen = set()
    base = loaded["tiny"].denoiser

    def forward(x, eta):
        seen.add(threading.current_thread().name)
        return base(x, eta)

    models = {"tiny": Prepared(loaded["tiny"], forward), "tiny-eps": loaded["tiny-eps"]}
    eng = Engine(models, EngineConfig(max_batch=4), device_thread=dt).start()
    try:
        eng.submit(spec("d", steps=2, solver="euler", n=2)).result(60)
        assert seen == {dt.name}  # (dt.call would wait behind the engine's loop, which holds the thread)
    finally:
        eng.close()


def test_submit_many_queues_a_round_that_shares_its_first_tick(loaded):
    """submit_many holds the engine's lock while it queues: the device thread cannot plan a tick
    with part of the round (one submit() after another can, and the rest then runs a step behind)."""
    shapes = []
    base = loaded["tiny"].denoiser

    def forward(x, eta):
        shapes.append(x.shape[0])
        return base(x, eta)

    eng = make_engine(loaded, max_batch=4, forwards={"tiny": forward})
    started_alone = threading.Event()

    def round_of_two():
        yield spec("a", n=2)
        # an idle device thread would take `a` alone within this second if the lock were free
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not started_alone.is_set():
            if eng.status("a") == "running" or shapes:
                started_alone.set()
            time.sleep(0.01)
        yield spec("b", n=2, seed=1)

    try:
        futs = eng.submit_many(round_of_two())
        a, b = (f.result(60) for f in futs)
        assert not started_alone.is_set()
        assert a.metrics.batch_sizes == b.metrics.batch_sizes == [4]
        assert shapes == [4] * 4  # four DDIM steps, both requests in every forward
    finally:
        eng.close()
