"""End to end: real Redis, `arcdiff serve`, `arcdiff worker` and a real Prometheus scraping them.

Runs generations through the API, then reads back through Prometheus's HTTP API that the
throughput and latency series exist and are non-zero, that every contract metric is exposed with
its labels, and that every dashboard and alert expression evaluates against the real series.

Needs: redis-server, Debian's prometheus, and the service (arcdiff/cli/serve.py and
worker.py); skips, saying which is missing, otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    API_JOB,
    CONTRACT,
    EXPOSED,
    ROOT,
    WORKER_JOB,
    Prometheus,
    PromQLError,
    dashboard_exprs,
    dashboards,
    derive_prometheus_config,
    find_binary,
    free_port,
    http_get,
    rule_exprs,
    stop_process,
    substitute_grafana_vars,
    wait_until,
)

SERVICE_FILES = [ROOT / "arcdiff" / "cli" / "serve.py", ROOT / "arcdiff" / "cli" / "worker.py"]
MODEL = "tiny"
REQUESTS = 4
IMAGES_PER_REQUEST = 2
STEPS = 4  # rk4: 16 network evaluations per image

# dashboard panels that must show data after a few generations (the others, e.g. errors and
# rejections, may rightly be empty)
MUST_HAVE_DATA = (
    "Images / s by model and solver",
    "Network evaluations / s",
    "API request latency (p50 / p95 / p99)",
    "Per-image time in the worker (p50 / p95)",
    "Batch size (mean / p95)",
    "Queue depth",
    "Workers up / busy",
    "Generation requests / s",
)


def arcdiff_command() -> list[str]:
    script = Path(sys.executable).with_name("arcdiff")
    return [str(script)] if script.exists() else [sys.executable, "-m", "arcdiff.cli"]


class Proc:
    """A subprocess with its output in a log file, for failure messages."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str]):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - the process writes to it until stop() closes it
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=workdir)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)
        self.log.close()


def make_tiny_model(folder: Path) -> None:
    import torch

    from arcdiff.model.configs import get_config
    from arcdiff.model.format import make_config, save_model
    from arcdiff.model.unet import UNet

    torch.manual_seed(0)
    cfg = get_config("tiny")
    save_model(folder / MODEL, UNet(cfg), make_config(MODEL, cfg, "x0_eps", {"steps": 0}))


def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prometheus_bin):
    missing = [str(p.relative_to(ROOT)) for p in SERVICE_FILES if not p.exists()]
    if missing:
        pytest.skip(f"the service is not built yet: {', '.join(missing)} missing")
    redis_bin = find_binary("redis-server")
    if redis_bin is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    work = tmp_path_factory.mktemp("e2e")
    make_tiny_model(work / "models")
    redis_port, api_port, worker_port, prom_port = free_port(), free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCDIFF_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        ARCDIFF_MODEL_DIR=str(work / "models"), ARCDIFF_TORCH_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)
    )
    procs: list[Proc] = []
    try:
        procs.append(
            Proc(
                "redis",
                [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                work,
                env,
            )
        )
        procs.append(
            Proc(
                "worker",
                [
                    *arcdiff_command(),
                    "worker",
                    "--model",
                    MODEL,
                    "--device",
                    "cpu",
                    "--max-batch",
                    "8",
                    "--redis",
                    redis_url,
                    "--metrics-port",
                    str(worker_port),
                ],
                work,
                env,
            )
        )
        procs.append(
            Proc(
                "api",
                [*arcdiff_command(), "serve", "--host", "127.0.0.1", "--port", str(api_port), "--redis", redis_url],
                work,
                env,
            )
        )
        api = f"http://127.0.0.1:{api_port}"

        def ready():
            for p in procs:
                p.check_alive()
            return http_get(api + "/readyz", timeout=2)[0] == 200

        wait_until(ready, 120, "the API's /readyz (Redis reachable, a worker serving the model)", interval=0.5)
        cfg = derive_prometheus_config(
            {
                API_JOB: [f"127.0.0.1:{api_port}"],
                WORKER_JOB: [f"127.0.0.1:{worker_port}"],
                "prometheus": [f"127.0.0.1:{prom_port}"],
            }
        )
        (work / "prometheus").mkdir()
        with Prometheus(prometheus_bin, cfg, work / "prometheus", port=prom_port) as prom:
            wait_until(lambda: set(prom.targets_up().values()) == {"up"}, 20, "Prometheus to scrape api and worker")
            t0 = time.monotonic()
            results = []
            for i in range(REQUESTS):
                body = {
                    "model": MODEL,
                    "steps": STEPS,
                    "solver": "rk4",
                    "seed": i,
                    "n": IMAGES_PER_REQUEST,
                    "wait": True,
                }
                status, res = post_json(api + "/v1/generations", body)
                if status == 202:  # not finished within the API's wait: poll
                    url = api + res["url"]

                    def done(url: str = url) -> Any:
                        r = json.loads(http_get(url)[1])
                        return r["status"] in ("finished", "failed") and r

                    res = wait_until(
                        done,
                        120,
                        f"generation {res['id']}",
                    )
                    status = 200
                results.append((status, res))
            elapsed = time.monotonic() - t0
            yield {
                "prom": prom,
                "api": api,
                "procs": procs,
                "results": results,
                "elapsed": elapsed,
                "worker_port": worker_port,
            }
    except Exception:
        for p in procs:
            print(f"--- {p.name} log ---\n{p.tail()}", file=sys.stderr)
        raise
    finally:
        for p in reversed(procs):
            p.stop()


def test_generations_finish(stack):
    for status, res in stack["results"]:
        assert status == 200, res
        assert res["status"] == "finished", res
        assert len(res["images"]) == IMAGES_PER_REQUEST


def test_throughput_and_latency_series_exist_and_are_non_zero(stack):
    prom = stack["prom"]
    images = REQUESTS * IMAGES_PER_REQUEST
    # throughput: the counters reached what was generated, and their rate is non-zero
    wait_until(
        lambda: prom.value(f"sum(arcdiff_worker_images_total) >= {images}"),
        15,
        f"arcdiff_worker_images_total to reach {images} in Prometheus",
    )
    # rate() needs two scrapes inside its window after the increase
    wait_until(
        lambda: (prom.value("sum(rate(arcdiff_worker_images_total[1m]))") or 0) > 0, 10, "a non-zero images rate"
    )
    assert prom.value(f'sum(arcdiff_worker_images_total{{model="{MODEL}",solver="rk4"}})') == images
    assert prom.value("sum(arcdiff_worker_nfe_total)") >= images * 4 * STEPS
    assert prom.value("sum(rate(arcdiff_worker_nfe_total[1m]))") > 0
    # latency: API request duration and per-image sampling time
    # (the API is scraped on its own schedule: wait for a scrape after the last request)
    p99 = "max(histogram_quantile(0.99, sum by (le, route) (rate(arcdiff_http_request_duration_seconds_bucket[1m]))))"
    api_p99 = wait_until(lambda: (v := prom.value(p99)) is not None and v > 0 and v, 10, "a non-zero API p99 latency")
    assert api_p99 > 0
    p50 = "histogram_quantile(0.5, sum by (le) (rate(arcdiff_worker_sample_seconds_bucket[1m])))"
    sample_p50 = wait_until(lambda: (v := prom.value(p50)) is not None and v > 0 and v, 10, "a non-zero sampling p50")
    assert sample_p50 > 0
    wait_until(
        lambda: (prom.value("sum(rate(arcdiff_generation_requests_total[1m]))") or 0) > 0,
        10,
        "a non-zero generation request rate",
    )
    assert prom.value("sum(arcdiff_worker_up)") == 1


def test_contract_metrics_are_exposed_with_their_labels(stack):
    prom = stack["prom"]
    names = set(prom.api("label/__name__/values"))
    # a labelled counter has no series until something increments it: rejections may rightly be absent
    may_be_absent = {"arcdiff_generations_rejected"}
    missing = sorted({EXPOSED[s] for s in EXPOSED if s not in names} - may_be_absent)
    assert not missing, f"contract metrics not in Prometheus after generations: {missing}"
    wrong = {}
    for metric, (kind, labels) in CONTRACT.items():
        series = metric + {"counter": "_total", "histogram": "_bucket", "gauge": ""}[kind]
        for s in prom.api("series", **{"match[]": series}):
            have = set(s) - {"__name__", "job", "instance", "le", "pid"}
            if have != set(labels):
                wrong[series] = sorted(have)
    assert not wrong, f"series whose labels differ from the contract: {wrong}"


def test_dashboard_and_rule_expressions_evaluate_on_real_series(stack):
    prom = stack["prom"]
    errors, empty = [], []
    for d in dashboards().values():
        for where, expr in dashboard_exprs(d):
            q = substitute_grafana_vars(expr)
            try:
                if not prom.query(q):
                    empty.append(where)
            except PromQLError as e:
                errors.append(f"{where}: {e}")
    for where, expr in rule_exprs():
        try:
            prom.query(expr)
        except PromQLError as e:
            errors.append(f"{where}: {e}")
    assert not errors, "\n".join(errors)
    print(f"dashboard queries without data after {REQUESTS} generations: {empty}")
    must = [w for w in empty if any(f"panel {t!r}" in w for t in MUST_HAVE_DATA)]
    assert not must, f"panels without data after {REQUESTS} generations: {must} (all empty: {empty})"
