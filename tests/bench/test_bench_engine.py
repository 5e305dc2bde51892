"""The benchmark commands run for real (subprocesses, real engine, real diffusers) on small
networks, and their JSON records are consistent. They check that the figures are computed right,
not how fast this machine is."""

import json
import os
import subprocess
import sys

import pytest
from servicekit import REPO


def cli(*args, env=None, timeout=600):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "arcdiff.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def test_bench_engine_record(tmp_path, model_dir):
    out = tmp_path / "engine.json"
    r = cli(
        "bench",
        "engine",
        "--model",
        "tiny",
        "--model-dir",
        str(model_dir),
        "--solver",
        "rk4",
        "--steps",
        "3",
        "--batch",
        "4",
        "--rounds",
        "3",
        "--device",
        "cpu",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["images"] == 12 and rec["nfe_per_image"] == 12 and rec["batch_sizes"] == [4]
    # every measured tick is one forward at batch 4: 3 rounds x 12 evaluations
    assert rec["forward_calls"] == 36
    assert 0 < rec["forward_s"] < rec["wall_s"] and 0 < rec["forward_share"] < 1
    assert rec["images_per_s"] == pytest.approx(12 / rec["wall_s"], rel=1e-2)
    assert rec["nfe_per_s"] == pytest.approx(12 * 12 / rec["wall_s"], rel=1e-2)
    assert rec["peak_rss_bytes"] > 10 * 2**20 and rec["environment"]["torch"]
    assert "of wall time in the forward" in r.stderr


def test_bench_engine_edit_share_mixes_inpainting_edits_at_the_same_nfe(tmp_path, model_dir):
    out = tmp_path / "engine.json"
    r = cli(
        "bench", "engine", "--model", "tiny", "--model-dir", str(model_dir), "--solver", "heun", "--steps", "3",
        "--batch", "4", "--rounds", "2", "--device", "cpu", "--edit-share", "0.5", "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["edit_share"] == 0.5 and rec["images"] == 8 and rec["nfe_per_image"] == 6
    assert rec["forward_calls"] == 12 and rec["batch_sizes"] == [4]  # edits and generations share each forward
    assert cli("bench", "engine", "--model", "tiny", "--edit-share", "2").returncode == 2


def test_bench_engine_below_max_batch_runs_the_exact_batch_eagerly(model_dir):
    """--max-batch: the worker's buckets (1, 2, 4, 8) and a running batch of 3 rows; the eager
    network sees 3 rows per call, not the bucket of 4."""
    common = ["bench", "engine", "--model", "tiny", "--model-dir", str(model_dir), "--device", "cpu"]
    r = cli(*common, "--steps", "2", "--batch", "3", "--max-batch", "8", "--rounds", "2", "--json", "-")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["batch"] == 3 and rec["max_batch"] == 8 and rec["batch_sizes"] == [3]
    assert rec["forward_calls"] == 4 and rec["forward_rows_per_call"] == 3
    r = cli(*common, "--batch", "4", "--max-batch", "2")
    assert r.returncode == 2 and "--max-batch must be at least --batch" in r.stderr


def test_bench_engine_random_config_and_errors(tmp_path):
    r = cli(
        "bench",
        "engine",
        "--config",
        "tiny",
        "--steps",
        "2",
        "--batch",
        "2",
        "--rounds",
        "1",
        "--device",
        "cpu",
        "--json",
        "-",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["model"] == "random-tiny" and rec["parameters"] > 1000 and rec["image_shape"] == [1, 8, 8]
    r = cli("bench", "engine", "--config", "nope", "--device", "cpu")
    assert r.returncode == 2 and "unknown network config 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = cli("bench", "engine", "--model", "nope", "--device", "cpu")
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr
    r = cli("bench", "engine", "--config", "tiny", "--solver", "lms")
    assert r.returncode == 2 and "unknown solver 'lms'" in r.stderr


def test_bench_diffusers_side_by_side(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "diffusers.json"
    r = cli(
        "bench",
        "diffusers",
        "--image-size",
        "16",
        "--steps",
        "2",
        "--batch",
        "1",
        "2",
        "--repeats",
        "1",
        "--device",
        "cpu",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert [row["batch"] for row in rec["results"]] == [1, 2] and rec["parameters"] > 10_000
    for row in rec["results"]:
        # two processes per side, one timed run each (after a warm-up)
        assert len(row["diffusers_runs_s"]) == 2 and len(row["arcdiff_runs_s"]) == 2
        # seconds kept to the microsecond, the ratio to 3 digits: runs of a few ms still compare
        assert row["ratio"] == pytest.approx(row["diffusers_s"] / row["arcdiff_s"], rel=5e-3, abs=1e-3)
        assert sorted(row["diffusers_runs_s"])[0] <= row["diffusers_s"] <= sorted(row["diffusers_runs_s"])[-1]
    assert "ratio" in r.stderr


def test_gpu_check_script_runs_on_cpu_and_refuses_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    env = {
        "DEVICE": "cpu",
        "CONFIG": "tiny",
        "STEPS": "2",
        "BATCHES": "1 2",
        "VARIANTS": "eager-fp32",
        "OUT": str(out),
        "PYTHON": sys.executable,
    }
    r = subprocess.run(
        ["bash", str(REPO / "deploy" / "gpu-check.sh")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "variant" in r.stdout and "eager-fp32" in r.stdout
    rec = json.loads(out.read_text())
    assert [row["batch"] for row in rec["rows"]] == [1, 2] and all("images/s" in row for row in rec["rows"])
    import torch

    if not torch.cuda.is_available():
        r = cli("bench", "gpu-check", "--config", "tiny", "--device", "cuda")
        assert r.returncode == 1 and "CUDA is not available" in r.stderr


def test_gpu_check_budget_skips_runs(tmp_path):
    r = cli(
        "bench",
        "gpu-check",
        "--config",
        "tiny",
        "--steps",
        "1",
        "--batches",
        "1",
        "2",
        "--variants",
        "eager-fp32",
        "--device",
        "cpu",
        "--budget-s",
        "0",
        "--json",
        "-",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    # with a budget of 0 s no run starts, and each is reported as skipped, not silently dropped
    assert [row.get("note") for row in rec["rows"]] == ["skipped: time budget"] * 2 and rec["records"] == []
    assert "skipped: time budget" in r.stderr


def test_bench_engine_mix_runs_every_solver_in_each_batch(tmp_path, model_dir):
    r = cli(
        "bench",
        "engine",
        "--model",
        "tiny",
        "--model-dir",
        str(model_dir),
        "--solver",
        "mix",
        "--steps",
        "4",
        "--batch",
        "30",
        "--rounds",
        "2",
        "--device",
        "cpu",
        "--json",
        "-",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    from arcdiff.model.solvers import GRIDS, SOLVERS

    gens = rec["generations_per_round"]
    # every solver on every grid, one image each
    assert sorted((g["solver"], g["schedule"]) for g in gens) == sorted((s, g) for s in SOLVERS for g in GRIDS)
    assert len(gens) == len(SOLVERS) * len(GRIDS) == 30 and all(g["n"] == 1 for g in gens)
    assert {g["solver"]: g["steps"] for g in gens}["rk4"] == 1 and rec["nfe_per_image"] == 4
    # all leave together after 4 evaluations, so 2 rounds are 8 full-batch forwards
    assert rec["forward_calls"] == 8 and rec["batch_sizes"] == [30]


def test_bench_flops_counts_the_network_and_the_run(tmp_path):
    """Counted FLOP follow the architecture: a 3x3 conv on 8x8 maps dominates the tiny net, so
    doubling its width about quadruples the count; the run total and the estimate are products."""
    out, wide = tmp_path / "f.json", tmp_path / "w.json"
    r = cli(
        "bench", "flops", "--config", "tiny", "--steps", "1000", "--batch", "16", "--tflops", "2", "--json", str(out)
    )
    assert r.returncode == 0, r.stderr
    r2 = cli("bench", "flops", "--config", "tiny", "--arch", "ch=16", "--json", str(wide))
    assert r2.returncode == 0, r2.stderr
    rec, rec_wide = json.loads(out.read_text()), json.loads(wide.read_text())
    assert 0 < rec["forward_gflop"] < rec["train_gflop_per_image"] < 4 * rec["forward_gflop"]
    assert 3.0 < rec_wide["forward_gflop"] / rec["forward_gflop"] < 4.2
    assert rec["total_flop"] == pytest.approx(rec["train_gflop_per_image"] * 1e9 * 16 * 1000)
    est = rec["estimates"][0]
    assert est["hours"] == pytest.approx(rec["total_flop"] / 2e12 / 3600)
    bad = cli("bench", "flops", "--config", "nope")
    assert bad.returncode == 2 and "nope" in bad.stderr
