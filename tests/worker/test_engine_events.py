"""The engine's progress, previews and cancel, in-process on the tiny models (no Redis, no HTTP)."""

import base64
import math
import threading
import time

import numpy as np
import pytest
import torch
from servicekit import one_thread, png_info, png_pixels, wait_until

from arcdiff.contract import GenerationSpec
from arcdiff.model.images import to_uint8
from arcdiff.model.rng import image_generator, image_seed, initial_noise
from arcdiff.worker.engine import Engine, EngineConfig, GenerationCanceled
from arcdiff.worker.loading import Prepared


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def spec(id, steps, solver="rk4", seed=0, n=1, preview=False):
    return GenerationSpec(
        id=id, model="tiny", steps=steps, solver=solver, seed=seed, n=n, submitted_at=time.time(), preview=preview
    )


def make_engine(loaded, max_batch=8, **config):
    lm = loaded["tiny"]
    models = {"tiny": Prepared(lm, lm.denoiser)}
    return Engine(models, EngineConfig(max_batch=max_batch, worker="test", **config)).start()


class Recorder:
    """A listener that keeps every event (called from the device and encode threads)."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, event, data):
        with self.lock:
            self.events.append((event, data))

    def of(self, kind):
        with self.lock:
            return [d for e, d in self.events if e == kind]


def test_progress_counts_every_evaluation_and_previews_are_x0_hat(loaded):
    eng = make_engine(loaded, progress_interval_s=0.0, preview_interval_s=0.0)
    rec = Recorder()
    try:
        s = spec("p", steps=50, seed=11, n=2, preview=True)
        eng.submit(s, listener=rec).result(120)
    finally:
        eng.close()
    progress = rec.of("progress")
    done = [p["nfe_done"] for p in progress]
    assert done == sorted(done) and len(set(done)) == len(done), "nfe_done must only grow"
    assert all(p["nfe_total"] == 2 * 200 for p in progress)
    assert progress[-1] == {"nfe_done": 400, "nfe_total": 400, "images_done": 2}
    # with no interval, one progress event per evaluation (two rows each)
    assert done == list(range(2, 401, 2))
    previews = rec.of("preview")
    for k in (0, 1):
        steps_seen = [p["nfe_done"] for p in previews if p["index"] == k]
        assert steps_seen[:3] == [1, 2, 3], steps_seen[:5]
    # the first preview is the network's x0_hat at the starting point (x_T, eta = pi/2), no other call
    denoiser = loaded["tiny"].denoiser
    for k in (0, 1):
        first = next(p for p in previews if p["index"] == k and p["nfe_done"] == 1)
        png = base64.b64decode(first["png_base64"])
        assert png_info(png) == ("PNG:L", (8, 8))
        x_T = initial_noise(loaded["tiny"].image_shape, image_generator(image_seed(11, k)))[None]
        with torch.inference_mode():
            x0_hat, _ = denoiser(x_T, torch.full((1,), math.pi / 2))
        want = to_uint8(x0_hat).numpy()[0, 0].astype(int)
        assert np.abs(png_pixels(png).astype(int) - want).max() <= 1


def test_events_are_rate_limited_and_previews_only_when_asked(loaded):
    eng = make_engine(loaded, progress_interval_s=3600.0, preview_interval_s=3600.0)
    quiet, asked = Recorder(), Recorder()
    try:
        a = eng.submit(spec("quiet", steps=30, n=2), listener=quiet)
        b = eng.submit(spec("asked", steps=30, n=1, preview=True), listener=asked)
        a.result(120), b.result(120)
    finally:
        eng.close()
    assert quiet.of("preview") == []
    # one round of previews (the first evaluation), then none within the hour
    assert [p["nfe_done"] for p in asked.of("preview")] == [1]
    # progress: the first evaluation, then only when images finish (the interval never passes)
    assert [p["images_done"] for p in quiet.of("progress")] == [0, 2]
    assert quiet.of("progress")[-1]["nfe_done"] == 240


def test_cancel_waiting_and_running_generations_frees_their_slots(loaded):
    eng = make_engine(loaded, max_batch=2, progress_interval_s=0.0)
    long_rec, queued_rec = Recorder(), Recorder()
    try:
        long = eng.submit(spec("long", steps=1000, n=2), listener=long_rec)
        wait_until(lambda: eng.occupancy("tiny").running == 2, 60, "the long generation to fill the batch", 0.01)
        queued = eng.submit(spec("queued", steps=5, solver="ddim"), listener=queued_rec)
        short = eng.submit(spec("short", steps=5, solver="ddim", seed=3))
        assert eng.status("queued") == "queued" and eng.occupancy("tiny").waiting == 2
        assert eng.cancel("queued")
        with pytest.raises(GenerationCanceled, match="canceled on request"):
            queued.result(5)
        assert eng.occupancy("tiny").waiting == 1 and eng.status("queued") is None
        assert not eng.cancel("queued") and not eng.cancel("unknown")
        wait_until(lambda: long_rec.of("progress"), 60, "the long generation's progress", 0.01)
        assert eng.cancel("long")
        with pytest.raises(GenerationCanceled):
            long.result(5)
        result = short.result(60)  # took a freed slot
        assert result.metrics.batch_sizes == [1], "the canceled rows stayed in the batch"
        wait_until(lambda: eng.occupancy("tiny").running == 0 and eng.held() == 0, 10, "an empty engine", 0.01)
    finally:
        eng.close()
    assert queued_rec.events == []  # it never ran
    assert long_rec.of("progress")[-1]["nfe_done"] < 8000
