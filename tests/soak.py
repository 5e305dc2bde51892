"""Soak test (not in the default suite): `python tests/soak.py [--requests 400 --clients 8 --minutes 3]`.

A real redis-server, `arcdiff serve --redis` and two `arcdiff worker` processes on tiny models made
on the spot. Concurrent clients send a few hundred mixed requests (models, solvers, steps, n, wait
or poll, PNG or JSON, a few invalid ones) spread over the run, honouring Retry-After on 429/503,
while a restarter replaces a worker every --restart-every seconds, alternately with SIGTERM
(drain) and SIGKILL (its jobs are retried by RQ). At the end every request must be accounted for:
rejected with a 4xx it deserved, or accepted and then finished or failed with a reason. Prints
the counts; exits 1 if anything is unaccounted for, a 5xx was seen or a finished generation is
wrong. Ports are free loopback ports; nothing outside a temporary folder is touched.
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from servicekit import (
    RedisServer,
    free_port,
    make_models,
    start_api,
    start_worker,
    stop,
    wait_until,
    wait_workers,
)

SOLVERS = ["euler", "heun", "rk4", "ddim", "ddpm", "dpmpp2m"]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.accepted: dict[str, dict] = {}  # id -> request body
        self.rejected = collections.Counter()  # final 4xx by status (invalid on purpose)
        self.retried = collections.Counter()  # 429/503 answers that were retried
        self.server_errors: list[str] = []
        self.transport_errors = 0
        self.unexpected: list[str] = []


def make_body(rng: random.Random, i: int) -> tuple[dict, dict, int | None]:
    """(body, headers, expected 4xx or None)."""
    if i % 25 == 7:  # an invalid request now and then: it must be a 422, never accepted
        return {"model": "tiny", "steps": rng.choice([0, 5000, "ten"]), "solver": "rk4"}, {}, 422
    body = {
        "model": rng.choice(["tiny", "tiny-eps"]),
        "steps": rng.randint(1, 30),
        "solver": rng.choice(SOLVERS),
        "seed": rng.randrange(2**32),
        "n": rng.choice([1, 1, 2, 4]),
        "wait": rng.random() < 0.4,
    }
    headers = {}
    if body["wait"] and body["n"] == 1 and rng.random() < 0.3:
        headers["accept"] = "image/png"
    return body, headers, None


def client_loop(base: str, tally: Tally, total: int, spacing: float, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=120) as c:
        while True:
            with tally.lock:
                if tally.sent >= total:
                    return
                i = tally.sent
                tally.sent += 1
            time.sleep(rng.uniform(0, 2 * spacing))
            body, headers, expect = make_body(rng, i)
            for _attempt in range(60):
                try:
                    r = c.post("/v1/generations", json=body, headers=headers)
                except httpx.TransportError:
                    with tally.lock:
                        tally.transport_errors += 1
                    time.sleep(1)
                    continue
                if r.status_code in (429, 503):
                    with tally.lock:
                        tally.retried[r.status_code] += 1
                    time.sleep(min(5.0, float(r.headers.get("retry-after", "1"))))
                    continue
                break
            else:
                with tally.lock:
                    tally.unexpected.append(f"request {i}: still refused after 60 tries: {r.status_code}")
                continue
            with tally.lock:
                # the one documented 500: a PNG was asked for and the generation failed (the body says why)
                failed_png = r.status_code == 500 and headers.get("accept") == "image/png" and "location" in r.headers
                if r.status_code >= 500 and not failed_png:
                    tally.server_errors.append(f"{r.status_code} {r.text[:200]}")
                if expect is not None:
                    if r.status_code != expect:
                        tally.unexpected.append(f"request {i}: wanted {expect}, got {r.status_code} {r.text[:200]}")
                    tally.rejected[r.status_code] += 1
                elif r.status_code in (200, 202, 500):
                    gen_id = r.headers.get("x-generation-id") or r.headers["location"].rsplit("/", 1)[1]
                    tally.accepted[gen_id] = body
                else:
                    tally.unexpected.append(f"request {i}: {r.status_code} {r.text[:200]}")


def restarter(redis_url, model_dir, logs, workers, every, stop_event, events):
    k = 0
    while not stop_event.wait(every):
        victim = workers.pop(0)
        sig = signal.SIGTERM if k % 2 == 0 else signal.SIGKILL
        stop(victim, sig, timeout=90)
        events.append(f"{time.strftime('%H:%M:%S')} worker {victim.pid}: {sig.name}")
        workers.append(
            start_worker(
                redis_url,
                model_dir,
                logs / f"worker{len(events) + 1}.log",
                models=("tiny", "tiny-eps"),
                max_batch=8,
                **WORKER_ENV,
            )
        )
        k += 1


WORKER_ENV = {
    "ARCDIFF_HEARTBEAT_S": "1",
    "ARCDIFF_MAINTENANCE_S": "2",
    "ARCDIFF_DRAIN_TIMEOUT_S": "3",
    "ARCDIFF_WORKER_TTL_S": "10",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--minutes", type=float, default=3.0, help="time over which the requests are spread")
    p.add_argument("--restart-every", type=float, default=30.0, help="seconds between worker restarts")
    p.add_argument("--settle", type=float, default=300.0, help="seconds allowed after the last request")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="arcdiff-soak-"))
    logs = tmp / "logs"
    logs.mkdir()
    model_dir = make_models(tmp / "models")
    server = RedisServer(tmp)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api = start_api(
        port,
        model_dir,
        logs / "api.log",
        redis_url=server.url,
        ARCDIFF_RETRIES="5",
        ARCDIFF_MAX_IMAGES="4",
        ARCDIFF_READY_CACHE_S="1",
    )
    workers = [
        start_worker(
            server.url, model_dir, logs / f"worker{i}.log", models=("tiny", "tiny-eps"), max_batch=8, **WORKER_ENV
        )
        for i in range(2)
    ]
    stop_event, events = threading.Event(), []
    t_start = time.monotonic()
    try:
        wait_workers(server.url, "tiny", 2, workers, timeout=180)

        def ready() -> bool:
            if api.poll() is not None:
                raise RuntimeError(f"the API exited with {api.returncode}; see {logs / 'api.log'}")
            try:
                return httpx.get(base + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "the API", interval=0.5)
        print(
            f"soak: {args.requests} requests from {args.clients} clients over {args.minutes:g} min, "
            f"a worker restarted every {args.restart_every:g} s; logs in {logs}",
            flush=True,
        )
        tally = Tally()
        spacing = args.minutes * 60 * args.clients / max(1, args.requests)
        r_thread = threading.Thread(
            target=restarter,
            args=(server.url, model_dir, logs, workers, args.restart_every, stop_event, events),
            daemon=True,
        )
        r_thread.start()
        clients = [
            threading.Thread(target=client_loop, args=(base, tally, args.requests, spacing, 1000 + k))
            for k in range(args.clients)
        ]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        sent_s = time.monotonic() - t_start
        stop_event.set()
        r_thread.join(120)
        print(f"soak: all sent after {sent_s:.0f} s; waiting for the accepted ones to end", flush=True)

        final: dict[str, dict] = {}
        deadline = time.monotonic() + args.settle
        with httpx.Client(base_url=base, timeout=60) as c:
            while len(final) < len(tally.accepted) and time.monotonic() < deadline:
                for gen_id in [g for g in tally.accepted if g not in final]:
                    try:
                        r = c.get(f"/v1/generations/{gen_id}")
                    except httpx.TransportError:
                        continue
                    if r.status_code == 200 and r.json()["status"] in ("finished", "failed"):
                        final[gen_id] = r.json()
                    elif r.status_code == 404:
                        final[gen_id] = {"status": "lost", "error": "404: unknown to the API"}
                time.sleep(0.5)

        statuses = collections.Counter(g["status"] for g in final.values())
        reasons = collections.Counter(
            (g.get("error") or "").splitlines()[-1][:100] for g in final.values() if g["status"] != "finished"
        )
        wrong = [
            g["id"]
            for g in final.values()
            if g["status"] == "finished" and len(g["images"]) != tally.accepted[g["id"]]["n"]
        ]
        unaccounted = [g for g in tally.accepted if g not in final or final[g]["status"] == "lost"]
        print("\n=== soak counts ===")
        print(f"requests sent:              {tally.sent}")
        print(f"rejected as invalid (4xx):  {sum(tally.rejected.values())} {dict(tally.rejected)}")
        print(f"accepted:                   {len(tally.accepted)}")
        print(f"  finished:                 {statuses.get('finished', 0)}")
        print(f"  failed (with a reason):   {statuses.get('failed', 0)} {dict(reasons)}")
        print(f"  unaccounted for:          {len(unaccounted)}")
        print(f"429/503 answers retried:    {dict(tally.retried)}")
        print(f"transport errors retried:   {tally.transport_errors}")
        print(f"server errors (5xx):        {len(tally.server_errors)}")
        print(f"finished with wrong images: {len(wrong)}")
        print(f"worker restarts:            {len(events)}")
        for e in events:
            print(f"  {e}")
        print(f"wall time:                  {time.monotonic() - t_start:.0f} s")
        for u in tally.unexpected[:10]:
            print("unexpected:", u)
        for e in tally.server_errors[:10]:
            print("5xx:", e)
        ok = (
            not unaccounted
            and not tally.server_errors
            and not wrong
            and not tally.unexpected
            and tally.sent == sum(tally.rejected.values()) + len(tally.accepted)
            and all(g.get("error") for g in final.values() if g["status"] == "failed")
        )
        print("soak:", "OK: every request accounted for" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        stop_event.set()
        for w in workers:
            stop(w, signal.SIGKILL, timeout=10)
        stop(api)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
