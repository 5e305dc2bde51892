"""A real `arcdiff worker --compile default` (inductor on this CPU) behind a real API and Redis:
it compiles every bucket before taking a job, shows it on its metrics port meanwhile, and serves
the same images as eager sampling. Slow (inductor compiles each bucket): `pytest -m slow`."""

import subprocess
import sys

import httpx
import pytest
from servicekit import REPO, assert_images_match, child_env, free_port, start_api, stop, wait_api_ready, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_compiled_worker_warms_up_then_serves_the_same_images(redis_server, model_dir, tmp_path):
    redis_server.client.flushall()
    api_port, metrics_port = free_port(), free_port()
    api = start_api(api_port, model_dir, tmp_path / "api.log", redis_url=redis_server.url, ARCDIFF_MODELS="tiny")
    cmd = [
        sys.executable,
        "-m",
        "arcdiff.cli",
        "worker",
        "--redis",
        redis_server.url,
        "--model",
        "tiny",
        "--max-batch",
        "2",
        "--metrics-port",
        str(metrics_port),
        "--device",
        "cpu",
        "--compile",
        "default",
    ]
    worker = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(model_dir),
        stdout=(tmp_path / "worker.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=120)
    try:

        def metrics() -> str | None:
            try:
                return httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            except httpx.TransportError:
                return None

        # the port opens before the warm-up finishes: the worker is alive but not up yet
        first = wait_until(metrics, 120, "the worker's metrics port", interval=0.2)
        assert "arcdiff_worker_up 0.0" in first, "the worker took jobs before its warm-up"
        wait_api_ready(api, http, tmp_path / "api.log", timeout=300)
        text = metrics()
        compile_s = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith('arcdiff_worker_compile_seconds{model="tiny"}')
        ]
        assert compile_s and compile_s[0] > 1.0, text[-2000:]
        assert "arcdiff_worker_up 1.0" in text
        for steps, solver, seed, n in ((3, "rk4", 5, 2), (4, "dpmpp2m", 9, 1), (2, "ddpm", 11, 2)):
            r = http.post(
                "/v1/generations",
                json={"model": "tiny", "steps": steps, "solver": solver, "seed": seed, "n": n, "wait": True},
            )
            assert r.status_code == 200 and r.json()["status"] == "finished", r.text
            assert_images_match(r.json()["images"], model_dir, "tiny", steps, solver, seed)
        log = (tmp_path / "worker.log").read_text()
        assert "warmed up tiny on cpu: buckets [1, 2]" in log and "serving it uncompiled" not in log
    finally:
        http.close()
        stop(worker)
        stop(api)
