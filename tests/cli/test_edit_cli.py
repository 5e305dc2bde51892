"""`arcdiff edit` and `arcdiff interpolate` run locally on the tiny model: the grid they write, the
kept pixels of an inpainting, and their refusals."""

import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from servicekit import REPO


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "arcdiff.cli", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
    )


def test_edit_and_interpolate_write_their_grids(tmp_path, model_dir):
    digit = (np.add.outer(np.arange(8), np.arange(8)) * 16).clip(0, 255).astype(np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255
    Image.fromarray(digit, "L").save(tmp_path / "in.png")
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    common = ["--model", "tiny", "--model-dir", str(model_dir), "--device", "cpu", "--steps", "4", "--solver", "heun"]
    r = cli("edit", *common, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
            "-n", "2", "--nrow", "2", "-o", str(tmp_path / "out.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "the last 4 of 4 heun steps" in r.stdout and "8 NFE each" in r.stdout
    grid = np.asarray(Image.open(io.BytesIO((tmp_path / "out.png").read_bytes())))
    assert grid.shape == (2 + 8 + 2, 2 + 2 * (8 + 2))  # one row of two, 2-pixel padding
    assert np.array_equal(grid[2:6, 2:10], digit[:4])  # the kept top half, exactly
    r = cli("edit", *common, "--image", str(tmp_path / "in.png"), "--strength", "0.5", "-o", str(tmp_path / "e.png"))
    assert r.returncode == 0 and "the last 2 of 4 heun steps" in r.stdout and "4 NFE each" in r.stdout
    r = cli("interpolate", *common, "--seeds", "1", "2", "-k", "3", "-o", str(tmp_path / "strip.png"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "strip.png").size == (2 + 3 * 10, 12)
    Image.fromarray(np.zeros((28, 28), np.uint8), "L").save(tmp_path / "big.png")
    r = cli("edit", *common, "--image", str(tmp_path / "big.png"), "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "28x28 pixels; model tiny takes 8x8 images" in r.stderr
    r = cli("interpolate", *common[:-1], "ddpm", "--seeds", "1", "2", "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "deterministic" in r.stderr
