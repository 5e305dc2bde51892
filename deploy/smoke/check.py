"""The container smoke test's checks, run by deploy/smoke/run.sh against the stack it started.

Every wait is for an observable state (a status, a target up, a series present) with a deadline,
never a fixed sleep. Each check prints one line; the first failure stops the run with its reason.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from httpx_sse import connect_sse

T = TypeVar("T")
START = time.monotonic()


class SmokeFailure(Exception):
    pass


def say(what: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] ok: {what}", flush=True)


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 0.5) -> T:
    """probe() until it returns something other than None (or False); its last error in the failure."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value is not None and value is not False:
                return value
        except (httpx.HTTPError, KeyError, ValueError, SmokeFailure) as e:
            last = e
        time.sleep(every_s)
    raise SmokeFailure(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SmokeFailure(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return done


# --------------------------------------------------------------------------------- the API side
def ready(client: httpx.Client, model: str = "mnist") -> bool:
    if client.get("/readyz").status_code != 200:
        return False
    models = {m["name"]: m for m in client.get("/v1/models").json()}
    workers = models[model].get("workers", 1)  # embedded mode has no "workers" count of Redis workers
    return workers >= 1


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    r = client.post("/v1/generations", json=body)
    if r.status_code not in (200, 202):
        raise SmokeFailure(f"POST /v1/generations {body} -> {r.status_code} {r.text[:300]}")
    return r.json()["id"]


def status_of(client: httpx.Client, gid: str) -> dict[str, Any]:
    r = client.get(f"/v1/generations/{gid}")
    r.raise_for_status()
    return r.json()


def finished(client: httpx.Client, gid: str, timeout_s: float = 300) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body = status_of(client, gid)
        if body["status"] in ("failed", "canceled"):
            raise SmokeFailure(f"generation {gid} ended {body['status']}: {body.get('error')}")
        return body if body["status"] == "finished" else None

    return wait_for(f"generation {gid} to finish", probe, timeout_s)


def pngs(body: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(im["png_base64"]) for im in sorted(body["images"], key=lambda im: im["index"])]


def check_same_images(api: httpx.Client, embedded: httpx.Client) -> dict[str, Any]:
    request = {"model": "mnist", "steps": 8, "solver": "ddim", "seed": 7, "n": 3}
    through_worker = finished(api, submit(api, request))
    in_process = finished(embedded, submit(embedded, request))
    a, b = pngs(through_worker), pngs(in_process)
    if len(a) != 3 or a != b:
        raise SmokeFailure(f"PNGs through the worker differ from the embedded engine's ({len(a)} vs {len(b)} images)")
    if not a[0].startswith(b"\x89PNG"):
        raise SmokeFailure("images are not PNG")
    say(
        f"generation through Redis and the worker ({through_worker['metrics']['worker']}): 3 PNGs byte-identical "
        f"to the embedded engine's, total {through_worker['metrics']['total_ms']:.0f} ms"
    )
    return through_worker


def check_events(api: httpx.Client) -> None:
    gid = submit(api, {"model": "mnist", "steps": 20, "solver": "ddim", "seed": 3, "n": 2, "preview": True})
    seen: list[str] = []
    with connect_sse(api, "GET", f"/v1/generations/{gid}/events", timeout=120) as source:
        for event in source.iter_sse():
            seen.append(event.event)
            if event.event in ("finished", "failed", "canceled"):
                data = json.loads(event.data)
                break
    if seen[-1:] != ["finished"] or "progress" not in seen or data.get("id") != gid:
        raise SmokeFailure(f"SSE events of {gid}: {seen}")
    say(f"SSE: {len(seen)} events ({', '.join(sorted(set(seen)))}), ending in finished")


def check_client_errors(api: httpx.Client) -> None:
    """A 422 and a 404 (each with a message): they also feed the dashboard's error panels."""
    bad = api.post("/v1/generations", json={"model": "mnist", "steps": -1})
    missing = api.get("/v1/generations/does-not-exist")
    if bad.status_code != 422 or "message" not in bad.json() or missing.status_code != 404:
        raise SmokeFailure(f"bad input: {bad.status_code} {bad.text[:200]}; unknown id: {missing.status_code}")
    say("bad input -> 422 with a message, unknown id -> 404")


def check_drain(api: httpx.Client, compose: list[str]) -> None:
    """SIGTERM mid-generation (compose stop, within the stop grace period): the worker drains and
    the job finishes; it is not left 'started'."""
    gid = submit(api, {"model": "mnist", "steps": 400, "solver": "ddim", "seed": 11, "n": 4})
    wait_for(f"{gid} running", lambda: status_of(api, gid)["status"] == "running", 120, every_s=0.1)
    t0 = time.monotonic()
    run([*compose, "stop", "worker"])
    stopped_s = time.monotonic() - t0
    body = status_of(api, gid)
    if body["status"] != "finished" or len(body["images"]) != 4:
        raise SmokeFailure(f"after stopping the worker mid-generation {gid} is {body['status']}: {body.get('error')}")
    # the worker exits by itself once drained, well within compose's stop_grace_period (40 s)
    if stopped_s > 30:
        raise SmokeFailure(f"the worker took {stopped_s:.0f} s to stop: it did not exit after draining")
    say(f"worker stopped mid-generation drained it: {gid} finished, the stop took {stopped_s:.1f} s")


def check_redis_restart(api: httpx.Client, compose: list[str], kept: dict[str, Any]) -> None:
    """With the worker stopped, a queued generation and a finished one survive a Redis restart."""
    queued = submit(api, {"model": "mnist", "steps": 6, "solver": "ddim", "seed": 5, "n": 2})
    if status_of(api, queued)["status"] != "queued":
        raise SmokeFailure(f"{queued} should wait in the queue while no worker runs")
    run([*compose, "restart", "redis"])
    wait_for("the API ready after the Redis restart", lambda: api.get("/readyz").status_code == 200, 120)
    again = status_of(api, kept["id"])
    if again["status"] != "finished" or pngs(again) != pngs(kept):
        raise SmokeFailure(f"finished generation {kept['id']} changed across the Redis restart: {again['status']}")
    if status_of(api, queued)["status"] != "queued":
        raise SmokeFailure(f"queued generation {queued} lost in the Redis restart")
    run([*compose, "start", "worker"])
    body = finished(api, queued)
    say(f"Redis restart: finished {kept['id']} unchanged, queued {queued} kept and run once the worker came back")
    if len(body["images"]) != 2:
        raise SmokeFailure(f"{queued}: {len(body['images'])} images")


# --------------------------------------------------------------------------------- Prometheus
def grafana_exprs(dashboard: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, Grafana's variables filled in."""
    board = json.loads(dashboard.read_text())
    panels = list(board["panels"])
    for p in list(panels):
        panels += p.get("panels", [])  # rows hold panels of their own
    out = []
    for panel in panels:
        for target in panel.get("targets", []):
            if target.get("expr"):
                expr = target["expr"].replace("$__rate_interval", "1m").replace("$__interval", "1m")
                expr = re.sub(r"\$\{?model\}?", ".*", expr)
                if "$" in expr:
                    raise SmokeFailure(f"panel '{panel.get('title')}': unknown variable in {expr}")
                out.append((panel.get("title", "?"), expr))
    return out


def check_prometheus(prom: httpx.Client, rules_file: Path, dashboard: Path) -> None:
    def targets_up() -> list[dict[str, Any]] | None:
        active = prom.get("/api/v1/targets").json()["data"]["activeTargets"]
        jobs = {t["labels"]["job"] for t in active}
        if {"arcdiff-api", "arcdiff-worker", "prometheus"} <= jobs and all(t["health"] == "up" for t in active):
            return active
        return None

    active = wait_for("every Prometheus target up", targets_up, 120, every_s=1)
    say(f"Prometheus: {len(active)} targets up ({', '.join(sorted(t['labels']['job'] for t in active))})")

    wanted = {r["alert"] for g in yaml.safe_load(rules_file.read_text())["groups"] for r in g["rules"] if "alert" in r}

    def rules_ok() -> set[str] | None:
        groups = prom.get("/api/v1/rules").json()["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        if set(loaded) != wanted:
            raise SmokeFailure(f"rules loaded {sorted(loaded)} != alerts.yml {sorted(wanted)}")
        bad = {n: r.get("lastError") for n, r in loaded.items() if r.get("health") != "ok"}
        return set(loaded) if not bad else None

    loaded = wait_for("every alert rule loaded and evaluated", rules_ok, 60, every_s=1)
    say(f"Prometheus: all {len(loaded)} alert rules loaded and evaluated without error")

    queries = grafana_exprs(dashboard)

    def empty_panels() -> list[str] | None:
        empty = []
        for title, expr in queries:
            r = prom.get("/api/v1/query", params={"query": expr}).json()
            if r.get("status") != "success":
                raise SmokeFailure(f"panel '{title}': {expr}: {r.get('error')}")
            if not r["data"]["result"]:
                empty.append(f"'{title}': {expr}")
        if empty:
            raise SmokeFailure("panels without series: " + "; ".join(empty))
        return []

    wait_for("every dashboard query to return series", empty_panels, 90, every_s=2)
    say(f"Grafana dashboard: all {len(queries)} panel queries return series from this Prometheus")


# --------------------------------------------------------------------------------- containers
def check_healthchecks(containers: list[str]) -> None:
    def all_healthy() -> bool:
        bad = [c for c in containers if run(["podman", "healthcheck", "run", c], check=False).returncode != 0]
        if bad:
            raise SmokeFailure(f"unhealthy: {bad}")
        return True

    wait_for("every container's healthcheck to pass", all_healthy, 60, every_s=2)
    say(f"healthchecks pass in all {len(containers)} containers: {', '.join(containers)}")


def check_image(image: str) -> None:
    hc = run(["podman", "image", "inspect", "--format", "{{json .Config.Healthcheck}}", image]).stdout.strip()
    if "arcdiff-healthcheck" not in hc:
        raise SmokeFailure(f"{image} has no HEALTHCHECK in its config (built in OCI format?): {hc}")
    script = (
        "for p in /opt/arcdiff/arcdiff /opt/arcdiff/build /opt/arcdiff/arcdiff.egg-info /src /dist /wheels; "
        'do [ ! -e "$p" ] || { echo "leftover: $p"; exit 1; }; done; '
        "python -c \"import importlib.util as u, sys; sys.exit('OpenCV installed' if u.find_spec('cv2') else 0)\""
    )
    done = run(["podman", "run", "--rm", "--entrypoint", "sh", image, "-c", script], check=False)
    if done.returncode != 0:
        raise SmokeFailure(f"{image}: {done.stdout.strip()} {done.stderr.strip()[-300:]}")
    size = run(["podman", "image", "inspect", "--format", "{{.Size}}", image]).stdout.strip()
    say(f"image {image}: HEALTHCHECK kept, no build leftovers, no OpenCV, {int(size) / 1e9:.2f} GB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--api", required=True, help="the stack's API URL")
    p.add_argument("--embedded", required=True, help="URL of an embedded-mode API in the same image")
    p.add_argument("--prometheus", required=True)
    p.add_argument("--compose", required=True, help="the compose command as a JSON list")
    p.add_argument("--image", required=True)
    p.add_argument("--containers", required=True, help="comma-separated container names to healthcheck")
    p.add_argument("--rules", type=Path, default=Path("deploy/prometheus/alerts.yml"))
    p.add_argument("--dashboard", type=Path, default=Path("deploy/grafana/dashboards/arcdiff.json"))
    args = p.parse_args()
    compose = json.loads(args.compose)
    try:
        check_image(args.image)
        with (
            httpx.Client(base_url=args.api, timeout=60) as api,
            httpx.Client(base_url=args.embedded, timeout=60) as embedded,
            httpx.Client(base_url=args.prometheus, timeout=30) as prom,
        ):
            wait_for("the API ready with a live worker", lambda: ready(api), 600, every_s=1)
            wait_for("the embedded API ready", lambda: ready(embedded), 300, every_s=1)
            say("/readyz 200 on the stack's API (a worker registered) and on the embedded one")
            kept = check_same_images(api, embedded)
            check_events(api)
            check_client_errors(api)
            check_healthchecks(args.containers.split(","))
            check_drain(api, compose)
            check_redis_restart(api, compose, kept)
            check_prometheus(prom, args.rules, args.dashboard)
            check_healthchecks(args.containers.split(","))
    except SmokeFailure as e:
        print(f"SMOKE FAILED: {e}", file=sys.stderr)
        return 1
    print(f"smoke checks passed in {time.monotonic() - START:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
