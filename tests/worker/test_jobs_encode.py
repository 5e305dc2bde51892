"""The queue payload contract and the pixel/PNG helpers."""

import time

import pytest
import torch
from servicekit import png_info, png_pixels

from arcdiff.contract import (
    GenerationSpec,
    ImageResult,
    JobMetrics,
    JobResult,
    SpecError,
    queue_expiry,
    queue_model,
    queue_name,
)
from arcdiff.model.images import grid, png_bytes, to_uint8
from arcdiff.model.solvers import SOLVERS

GOOD = {"id": "a" * 32, "model": "tiny", "steps": 10, "solver": "rk4", "seed": 7, "n": 2, "submitted_at": time.time()}


def test_solver_names_match_the_model_package():
    from arcdiff.contract import SOLVER_NAMES

    assert SOLVER_NAMES == SOLVERS


def test_spec_round_trip():
    spec = GenerationSpec.from_payload(GOOD)
    assert GenerationSpec.from_payload(spec.to_payload()) == spec
    assert queue_name("mnist") == "arcdiff:mnist"


def test_priority_and_client_default_for_older_specs_and_pick_the_queue():
    old = GenerationSpec.from_payload(GOOD)  # a payload from before the fields existed
    assert (old.priority, old.client) == ("interactive", "")
    spec = GenerationSpec.from_payload({**GOOD, "priority": "batch", "client": "key:0123456789abcdef"})
    assert GenerationSpec.from_payload(spec.to_payload()) == spec
    assert queue_name("mnist", "batch") == "arcdiff:mnist:batch"
    assert queue_model(queue_name("mnist", "batch")) == ("mnist", "batch")
    assert queue_model(queue_name("mnist-eps")) == ("mnist-eps", "interactive")


def test_queue_expiry_counts_from_acceptance():
    spec = GenerationSpec.from_payload({**GOOD, "submitted_at": 1000.0})
    assert queue_expiry(spec, 30.0, 1029.9) is None
    assert queue_expiry(spec, None, 10**9) is None  # no timeout: never expires
    reason = queue_expiry(spec, 30.0, 1030.5)
    assert reason == (
        "expired: waited 30.5 s to start, longer than the queue timeout of 30 s (ARCDIFF_QUEUE_TIMEOUT_S)"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"steps": "10"}, "steps"),
        ({"steps": True}, "steps"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"n": 0}, "n must"),
        ({"solver": "rk5"}, "solver"),
        ({"model": ""}, "model"),
        ({"extra": 1}, "unknown field"),
        ({"submitted_at": "now"}, "submitted_at"),
        ({"priority": "urgent"}, "priority must be one of interactive, batch"),
        ({"priority": 1}, "priority"),
        ({"client": 7}, "client"),
        ({"client": "k" * 65}, "client"),
    ],
)
def test_bad_specs_name_the_field(change, message):
    with pytest.raises(SpecError, match=message):
        GenerationSpec.from_payload({**GOOD, **change})


def test_spec_must_be_an_object_with_every_field():
    with pytest.raises(SpecError, match="object"):
        GenerationSpec.from_payload([1, 2])
    with pytest.raises(SpecError, match=r"missing.*seed"):
        GenerationSpec.from_payload({k: v for k, v in GOOD.items() if k != "seed"})


def test_result_payload_round_trip():
    png = png_bytes(torch.zeros((1, 4, 4), dtype=torch.uint8))
    res = JobResult([ImageResult(0, 7, png)], 10, JobMetrics(1.0, 2.0, 3.0, 6.0, 10, [1, 4], "cpu", "w"))
    back = JobResult.from_payload(res.to_payload())
    assert back.images[0].png == png and back.metrics == res.metrics and back.nfe == 10


def test_pixels_and_png():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
    rgb = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    assert png_info(png_bytes(rgb)) == ("PNG:RGB", (7, 5))
    assert (png_pixels(png_bytes(rgb)) == rgb.permute(1, 2, 0).numpy()).all()
    with pytest.raises(ValueError, match="2 channels"):
        png_bytes(torch.zeros((2, 4, 4), dtype=torch.uint8))


def test_grid_layout():
    px = torch.stack([torch.full((1, 2, 3), i, dtype=torch.uint8) for i in range(5)])
    g = grid(px, pad=1)  # 3 per row, 2 rows
    assert g.shape == (1, 2 * 3 + 1, 3 * 4 + 1)
    assert g[0, 1, 1] == 0 and g[0, 1, 5] == 1 and g[0, 4, 5] == 4 and g[0, 4, 9] == 0


def test_stock_rq_task_runs_one_generation(model_dir, monkeypatch):
    """worker.tasks.generate: what a stock RQ worker runs; same JSON result as the batching worker."""
    from servicekit import assert_images_match, one_thread

    from arcdiff.worker import tasks

    monkeypatch.setenv("ARCDIFF_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("ARCDIFF_DEVICE", "cpu")
    try:
        with one_thread():
            res = tasks.generate({**GOOD, "steps": 2, "solver": "ddim", "n": 2, "submitted_at": time.time()})
            assert_images_match(res["images"], model_dir, "tiny", 2, "ddim", 7)
        assert res["nfe"] == 2 and res["metrics"]["worker"] == "rq-task"
        with pytest.raises(SpecError):
            tasks.generate({**GOOD, "steps": 0})
    finally:
        for eng in tasks._engines.values():
            eng.close()
        tasks._engines.clear()
