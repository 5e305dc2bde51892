"""Every PromQL expression of the dashboard and the alert rules, evaluated by a real Prometheus.

Debian's `prometheus` runs on a free loopback port with deploy/prometheus/prometheus.yml, its
targets rewritten to two stand-in exporters that serve every contract metric (names, types and
labels from deploy_helpers.CONTRACT) with changing values. Each expression must evaluate without
error, and each dashboard query must return data: a misspelt metric or label would return nothing.
The end-to-end test (test_deploy_e2e.py) does the same against the real service and worker.
"""

from __future__ import annotations

import itertools
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from deploy_helpers import (
    API_JOB,
    API_METRICS,
    CONTRACT,
    WORKER_JOB,
    WORKER_METRICS,
    Prometheus,
    PromQLError,
    dashboard_exprs,
    dashboard_variable_queries,
    dashboards,
    derive_prometheus_config,
    free_port,
    rule_exprs,
    substitute_grafana_vars,
    wait_until,
)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABEL_VALUES = {
    "model": ["mnist", "mnist-eps"],
    "solver": ["rk4", "dpmpp2m"],
    "route": ["/v1/generations", "/v1/generations/{id}"],
    "method": ["GET", "POST"],
    "reason": ["queue_full", "too_many_images"],
    "device": ["cuda:0"],
}
STATUS_VALUES = {
    "arcdiff_http_requests": ["200", "202", "429", "500"],
    "arcdiff_generation_requests": ["queued", "finished", "failed"],
    "arcdiff_worker_jobs": ["finished", "failed"],
}


class StandInExporter:
    """Serves the given contract metrics on a loopback port; tick() moves every series."""

    def __init__(self, names: list[str]):
        self.registry = CollectorRegistry()
        self.metrics = {}
        for name in names:
            kind, labels = CONTRACT[name]
            cls = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}[kind]
            self.metrics[name] = cls(name, f"stand-in for {name}", list(labels), registry=self.registry)
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # http.server's name
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def tick(self, rng: random.Random) -> None:
        for name, metric in self.metrics.items():
            kind, labels = CONTRACT[name]
            choices = [STATUS_VALUES[name] if lab == "status" else LABEL_VALUES[lab] for lab in labels]
            for combo in itertools.product(*choices):
                child = metric.labels(*combo) if labels else metric
                if kind == "counter":
                    child.inc(rng.randint(1, 5))
                elif kind == "histogram":
                    child.observe(rng.uniform(0.01, 40.0))
                else:
                    child.set(rng.randint(1, 64))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def prom(prometheus_bin, tmp_path_factory):
    api, worker = StandInExporter(API_METRICS), StandInExporter(WORKER_METRICS)
    stop = threading.Event()
    rng = random.Random(0)

    def ticker():
        while not stop.is_set():
            api.tick(rng)
            worker.tick(rng)
            stop.wait(0.3)

    t = threading.Thread(target=ticker, daemon=True)
    t.start()
    port = free_port()
    cfg = derive_prometheus_config(
        {
            API_JOB: [f"127.0.0.1:{api.port}"],
            WORKER_JOB: [f"127.0.0.1:{worker.port}"],
            "prometheus": [f"127.0.0.1:{port}"],
        }
    )
    try:
        with Prometheus(prometheus_bin, cfg, tmp_path_factory.mktemp("prometheus"), port=port) as p:
            # enough scrapes that rate() over the stand-ins' counters has two points per series
            wait_until(
                lambda: (
                    p.value("count(rate(arcdiff_worker_images_total[1m]) > 0)") == 4
                    and p.value("count(rate(arcdiff_http_request_duration_seconds_count[1m]) > 0)") == 2
                ),
                30,
                "two scrapes of both stand-in exporters",
            )
            yield p
    finally:
        stop.set()
        t.join(timeout=5)
        api.close()
        worker.close()


def test_targets_scraped(prom):
    assert prom.targets_up() == {API_JOB: "up", WORKER_JOB: "up", "prometheus": "up"}


DASHBOARD_EXPRS = [(w, e) for d in dashboards().values() for w, e in dashboard_exprs(d)]


@pytest.mark.parametrize("expr", [e for _, e in DASHBOARD_EXPRS], ids=[w for w, _ in DASHBOARD_EXPRS])
def test_dashboard_expression_evaluates_with_data(prom, expr):
    q = substitute_grafana_vars(expr)
    try:
        result = prom.query(q)
    except PromQLError as e:
        pytest.fail(f"{q}\n{e}")
    assert result, f"no data for {q}: a metric or label name does not match the contract"


def test_dashboard_variables_have_values(prom):
    for where, q in [x for d in dashboards().values() for x in dashboard_variable_queries(d)]:
        metric, label = q.removeprefix("label_values(").removesuffix(")").split(", ")
        values = prom.api(f"label/{label}/values", **{"match[]": metric})
        assert sorted(values) == sorted(LABEL_VALUES[label]), where


@pytest.mark.parametrize("where,expr", rule_exprs())
def test_rule_expression_evaluates(prom, where, expr):
    try:
        prom.query(expr)
    except PromQLError as e:
        pytest.fail(f"{where}: {expr}\n{e}")


def test_rules_loaded_and_evaluated_without_errors(prom):
    expected = {w.split("/", 1)[1] for w, _ in rule_exprs()}

    def evaluated():
        groups = prom.api("rules")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        if set(rules) != expected:
            return False
        return all(not r["lastEvaluation"].startswith("0001") for r in rules.values()) and rules

    rules = wait_until(evaluated, 15, f"rules {sorted(expected)} to be loaded and evaluated")
    bad = {n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}
    assert not bad, f"rules failing in Prometheus: {bad}"
