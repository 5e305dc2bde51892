"""A Redis-mode API process loads no torch: `arcdiff serve --redis` is started in a subprocess and,
once it is ready and has answered the model list and queued a generation, torch is not among its
modules. Embedded mode, which runs the engine in-process, still loads it and still generates.

(tests/test_layering.py checks the same statically: nothing service.app imports, but the embedded
backend, imports torch.)"""

import json
import subprocess
import sys

import pytest
from servicekit import REPO, child_env, free_port

pytestmark = pytest.mark.timeout(300)

# `arcdiff serve` in the main thread (uvicorn wants it for its signal handlers); a probe thread
# waits for /readyz, makes the requests, prints what it saw as one JSON line and ends the process
PROBE = r"""
import json, os, sys, threading, time, urllib.request

port, body = int(sys.argv[1]), json.loads(sys.argv[2])
base = f"http://127.0.0.1:{port}"


def call(method, path, data=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, json.loads(r.read())


def probe():
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call("GET", "/readyz")[0] == 200:
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        _, models = call("GET", "/v1/models")
        status, gen = call("POST", "/v1/generations", body)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "safetensors"))
        out = {"models": [m["name"] for m in models], "status": status, "gen": gen.get("status"), "loaded": loaded}
    except Exception as e:
        out = {"error": repr(e)}
    print("PROBE " + json.dumps(out), flush=True)
    os._exit(0)


threading.Thread(target=probe, daemon=True).start()
from arcdiff.cli.main import main

sys.exit(main(["serve", "--port", str(port), "--host", "127.0.0.1", *sys.argv[3:]]))
"""


def run_probe(model_dir, body: dict, *flags: str) -> dict:
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(port), json.dumps(body), *flags],
        cwd=REPO,
        env=child_env(model_dir),
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"no probe result (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    result = json.loads(lines[-1][len("PROBE ") :])
    assert "error" not in result, f"{result['error']}\n{out.stderr[-3000:]}"
    return result


def test_the_api_in_redis_mode_loads_no_torch(model_dir, redis_url):
    r = run_probe(model_dir, {"model": "tiny", "steps": 2, "solver": "euler"}, "--redis", redis_url)
    assert r["models"] == ["tiny", "tiny-eps"]  # the catalogue is read without torch
    assert (r["status"], r["gen"]) == (202, "queued")  # and the generation went to the queue
    assert r["loaded"] == [], f"the Redis-mode API imported {r['loaded'][:10]}"


def test_the_embedded_api_still_runs_the_engine(model_dir):
    r = run_probe(model_dir, {"model": "tiny", "steps": 2, "solver": "euler", "wait": True})
    assert (r["status"], r["gen"]) == (200, "finished")
    assert "torch" in r["loaded"]
