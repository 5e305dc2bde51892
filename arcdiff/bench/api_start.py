"""api-start: a Redis-mode API process's start time (launch to /readyz 200) and its memory.

The resident memory is VmRSS from /proc (Linux), read once it has answered /v1/models.

    arcdiff bench api-start --redis redis://127.0.0.1:6379/0 --runs 5
    python -m arcdiff.bench.api_start --redis ...      (the same, as a plain script)

Each run launches `python -m arcdiff.cli serve --redis URL` (the arcdiff on this interpreter's
path), polls /readyz every 10 ms, asks /v1/models, reads the RSS and stops it. Stdlib only, so the
same file measures another checkout: run it with that tree first on PYTHONPATH.
Figures: docs/performance.md#api-start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def one_run(redis_url: str, timeout: float) -> tuple[float, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "arcdiff.cli", "serve", "--port", str(port), "--redis", redis_url]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ok(base + "/readyz"):
            if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the API did not get ready (exit {proc.poll()})")
            time.sleep(0.01)
        ready_s = time.perf_counter() - t0
        if not ok(base + "/v1/models"):
            raise RuntimeError("/v1/models failed")
        return ready_s, rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", required=True, metavar="URL", help="a running Redis")
    p.add_argument("--runs", type=int, default=5, help="API processes started one after another (default 5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one may take to get ready")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    runs = [one_run(args.redis, args.timeout) for _ in range(args.runs)]
    ready, rss = [r[0] for r in runs], [r[1] for r in runs]
    print(f"arcdiff from {os.environ.get('PYTHONPATH') or 'the installed package'}, {args.runs} runs")
    print(f"start to /readyz: median {statistics.median(ready):.2f} s (min {min(ready):.2f}, max {max(ready):.2f})")
    print(f"RSS after /v1/models: median {statistics.median(rss):.0f} MiB (min {min(rss):.0f}, max {max(rss):.0f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ready_s": ready, "rss_mib": rss}, f, indent=2)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
