"""Helpers for tests/deploy: the shipped files, the metric contract, and a real Prometheus server.

Imported as a plain module (pytest puts tests/deploy on sys.path for the tests in it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
K8S_DIR = DEPLOY / "k8s"

API_PORT = 8000
WORKER_METRICS_PORT = 9101
API_JOB = "arcdiff-api"
WORKER_JOB = "arcdiff-worker"

# The metric contract between the service/worker and deploy/ (names in base units; label names).
# type: counter (exposed as NAME_total), histogram (NAME_bucket/_sum/_count) or gauge (NAME).
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    # API
    "arcdiff_http_requests": ("counter", ("route", "method", "status")),
    "arcdiff_http_request_duration_seconds": ("histogram", ("route",)),
    "arcdiff_generation_requests": ("counter", ("model", "solver", "status")),
    "arcdiff_generations_rejected": ("counter", ("reason",)),
    "arcdiff_queue_depth": ("gauge", ("model",)),
    # worker
    "arcdiff_worker_images": ("counter", ("model", "solver")),
    "arcdiff_worker_nfe": ("counter", ("model", "solver")),
    "arcdiff_worker_jobs": ("counter", ("model", "status")),
    "arcdiff_worker_batch_size": ("histogram", ("model",)),
    "arcdiff_worker_queue_wait_seconds": ("histogram", ("model",)),
    "arcdiff_worker_sample_seconds": ("histogram", ("model",)),
    "arcdiff_worker_encode_seconds": ("histogram", ("model",)),
    "arcdiff_worker_running_images": ("gauge", ("model",)),
    "arcdiff_worker_waiting_images": ("gauge", ("model",)),
    "arcdiff_worker_paused_images": ("gauge", ("model",)),
    "arcdiff_worker_load_seconds": ("gauge", ("model",)),
    "arcdiff_worker_compile_seconds": ("gauge", ("model",)),
    "arcdiff_worker_device_memory_bytes": ("gauge", ("device",)),
    "arcdiff_worker_up": ("gauge", ()),
    "arcdiff_worker_busy": ("gauge", ()),
}
API_METRICS = [n for n in CONTRACT if not n.startswith("arcdiff_worker_")]
WORKER_METRICS = [n for n in CONTRACT if n.startswith("arcdiff_worker_")]


def exposed_names(name: str) -> list[str]:
    """The series names Prometheus stores for one contract metric."""
    kind = CONTRACT[name][0]
    if kind == "counter":
        return [name + "_total"]
    if kind == "histogram":
        return [name + "_bucket", name + "_sum", name + "_count"]
    return [name]


EXPOSED = {series: name for name in CONTRACT for series in exposed_names(name)}


# ---------------------------------------------------------------------------- shipped files
class Tagged(NamedTuple):
    """A value under one of compose's merge tags (`!reset`, `!override`) in an override file."""

    tag: str
    value: Any


RESET = Tagged("!reset", {})


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return Tagged("!" + suffix, value)


_ComposeLoader.add_multi_constructor("!", _tagged)


def load_yaml(path: Path) -> Any:
    """YAML as compose reads it: its merge tags come back as Tagged values."""
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of a dashboard."""
    out = []
    for p in iter_panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"{dash.get('uid')}: panel {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    return out


def dashboard_variable_queries(dash: dict) -> list[tuple[str, str]]:
    out = []
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            out.append((f"{dash.get('uid')}: variable ${v['name']}", q))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for g in load_yaml(ALERTS_YML)["groups"]:
        for r in g["rules"]:
            out.append((f"rule {g['name']}/{r.get('alert') or r.get('record')}", r["expr"]))
    return out


# Grafana's variables, replaced by what they mean for a query at "now" (dashboard variables
# are multi-value with allValue ".*", used only in =~ matchers).
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".*",
}


def substitute_grafana_vars(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    leftover = re.findall(r"\$\{?\w+", expr)
    if leftover:
        raise ValueError(f"unknown Grafana variable(s) {leftover} in {expr!r}")
    return expr


METRIC_RE = re.compile(r"\barcdiff_[a-z0-9_]+")


def metric_names_in(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


# ---------------------------------------------------------------------------- processes, ports
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # keep polling, report the last failure
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# ---------------------------------------------------------------------------- Prometheus
def derive_prometheus_config(targets: dict[str, list[str]], scrape_interval: str = "1s") -> dict:
    """deploy/prometheus/prometheus.yml with every job's service discovery replaced by static
    targets (`targets`: job name -> host:port list), short intervals, and absolute rule paths.
    Jobs, metrics paths and relabelling stay as shipped."""
    cfg = copy.deepcopy(load_yaml(PROMETHEUS_YML))
    cfg.setdefault("global", {})
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["evaluation_interval"] = scrape_interval
    cfg["global"]["scrape_timeout"] = scrape_interval
    cfg["rule_files"] = [str((PROMETHEUS_YML.parent / f).resolve()) for f in cfg.get("rule_files", [])]
    cfg.pop("alerting", None)  # no Alertmanager in tests
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] not in targets:
            continue
        job = {k: v for k, v in job.items() if not k.endswith("_sd_configs") and k != "static_configs"}
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        jobs.append(job)
    missing = set(targets) - {j["job_name"] for j in jobs}
    if missing:
        raise KeyError(f"jobs {sorted(missing)} are not in {PROMETHEUS_YML}")
    cfg["scrape_configs"] = jobs
    return cfg


class Prometheus:
    """A real `prometheus` process on a free loopback port with its own data folder."""

    def __init__(self, binary: str, config: dict, workdir: Path, port: int | None = None):
        self.binary, self.workdir = binary, workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        try:
            wait_until(self._ready, 30, f"prometheus on {self.url} to be ready")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
        return http_get(self.url + "/-/ready", timeout=2)[0] == 200

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url, timeout=10)
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise PromQLError(f"{path} {params}: HTTP {status}: {data.get('errorType')}: {data.get('error')}")
        return data["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query at now; raises PromQLError if Prometheus rejects or fails it."""
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None

    def targets_up(self) -> dict[str, str]:
        return {t["labels"]["job"]: t["health"] for t in self.api("targets")["activeTargets"]}


class PromQLError(RuntimeError):
    pass


@contextlib.contextmanager
def running(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield proc
    finally:
        stop_process(proc)
