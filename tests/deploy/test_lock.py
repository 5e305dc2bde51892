"""constraints/lock.txt is what the tests run against and what the image installs: CI installs with
it, the Dockerfile installs with it (and checks the result with the same script), so a version
that drifts from it fails here before it reaches an image."""

from __future__ import annotations

import subprocess
import sys

from deploy_helpers import ROOT

LOCK = ROOT / "constraints" / "lock.txt"


def pins() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name] = version
    return out


def test_this_environment_has_the_locked_versions():
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "docker" / "lock.py"), "check", str(LOCK)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr + "\n(install with -c constraints/lock.txt, or write the lock again)"


def test_lock_agrees_with_the_cpu_constraint_and_leaves_out_opencv():
    cpu = dict(
        line.split("==", 1) for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines() if "==" in line
    )
    assert pins()["torch"] == cpu["torch"]
    assert not [n for n in pins() if "opencv" in n], "OpenCV crept into the lock (the eval extra must not pull it)"
    assert "arcdiff" not in pins() and "pip" not in pins()


def test_ci_installs_with_the_lock():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints/lock.txt" in ci
