"""The built wheel installs one top-level name, `arcdiff` (and its dist-info), and its console
script runs from what the wheel installed."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from servicekit import REPO


@pytest.mark.slow
def test_the_wheel_adds_only_arcdiff_and_its_console_script_runs(tmp_path):
    dist, target = tmp_path / "dist", tmp_path / "site"
    # the venv's setuptools builds it (no build isolation: nothing is downloaded)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("arcdiff-*.whl")
    with zipfile.ZipFile(wheel) as z:
        top = {name.split("/")[0] for name in z.namelist()}
    assert top == {"arcdiff", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)

    # install it alone into an empty folder: what the wheel itself puts into site-packages
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    names = {p.name for p in target.iterdir()} - {"bin"}
    assert {n for n in names if not n.endswith(".dist-info")} == {"arcdiff"}, sorted(names)
    assert (target / "bin" / "arcdiff").is_file()

    # the console script, with the installed folder first on the path (ahead of any editable checkout)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import arcdiff; print(arcdiff.__file__)"],
        env=env,
        cwd=tmp_path,  # not the checkout: `python -c` puts the working directory first on the path
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout + where.stderr
    out = subprocess.run(
        [str(target / "bin" / "arcdiff"), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "worker" in out.stdout and "generate" in out.stdout
