"""a running service driven with a request mix: throughput, latency percentiles, errors (JSON out)

C concurrent client loops (one asyncio loop, arcdiff.client.AsyncClient) each start a request, wait
for its images (wait=true, polled if the server answers 202 first), then start the next, until
DURATION seconds have passed or MAX_REQUESTS have been started; requests still in flight are then
given up to TIMEOUT more seconds. Every request's latency is measured here, end to end; the
server's own latency record (queue, sample, encode) is collected from each finished generation.

The mix (--mix FILE) is a JSON list of entries, each picked with probability proportional to its
weight:

  [{"weight": 3, "request": {"model": "mnist", "steps": 10, "solver": "rk4", "n": 1}},
   {"weight": 1, "request": {"model": "mnist", "steps": 20, "solver": "ddim", "n": 4}, "name": "ddim-x4"}]

("weight" defaults to 1, "n" to 1, "name" to model/solver/steps/n). A request may also say
"priority" ("interactive" or "batch"). An entry with "loops": L gets L client loops of its own
instead (the C shared loops pick among the entries without "loops"), each starting its requests at
least "interval_s" seconds apart if given: a fixed background load beside the measured requests,
e.g. batch jobs that keep the worker full beside an interactive request every second. Without
--mix: the service's first model (GET /v1/models), rk4 10 steps n=1 (weight 3) and ddim 20 steps
n=4 (weight 1). The sequence of entries and seeds is fixed by --seed.

Per entry the record has its latency percentiles and its images per second in the first DURATION
seconds: images of the requests finished by then, over DURATION (requests still in flight then do
not count, and the time given to them after it does not dilute the rate; with long requests, use a
DURATION many times theirs).

Overload is counted, not hidden: the client never retries, so a 429 (queue full, rate limit) is
counted as `rejected` and a 503 as an error; the loop that got it waits the server's Retry-After (never
past DURATION) before its next request. Only loopback URLs are driven unless --allow-remote is given.

Exit status: 0 when the run completed (failed requests are reported, not fatal); 1 when no request
finished or the service cannot be reached; 2 for bad arguments or a bad mix file."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
REQUEST_KEYS = ("model", "steps", "solver", "n", "priority")
PRIORITIES = ("interactive", "batch")  # arcdiff.contract.PRIORITIES, not imported to keep this module light
SEED_MAX = 2**32 - 1  # arcdiff.contract.SEED_MAX, not imported to keep this module light
MAX_EXAMPLES = 3  # example messages kept per error kind


class MixError(ValueError):
    """A mix file that cannot be used; the message names the entry and the field."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"the service's base URL (default {DEFAULT_URL})")
    p.add_argument(
        "--concurrency",
        "-c",
        type=_positive_int,
        default=8,
        metavar="C",
        help="concurrent client loops, each one request at a time (default 8)",
    )
    p.add_argument(
        "--duration",
        "-d",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds during which new requests are started (default 30)",
    )
    p.add_argument(
        "--max-requests",
        type=_positive_int,
        default=10000,
        metavar="N",
        help="start at most N requests in all (default 10000)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="after DURATION, seconds to wait for requests in flight; those still unfinished count "
        "as errors (GenerationTimeout) (default 60)",
    )
    p.add_argument(
        "--mix",
        metavar="FILE",
        help="JSON list of {weight, request: {model, steps, solver, n, priority?}, loops?, interval_s?} "
        "(default: the first served model, rk4 10 steps n=1 and ddim 20 steps n=4)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="K",
        help="seed of the sequence of mix entries and request seeds (default 0)",
    )
    p.add_argument("--api-key", metavar="KEY", help="the service's API key (default ARCDIFF_API_KEY)")
    p.add_argument(
        "--metrics-url",
        metavar="URL",
        help="Prometheus page whose arcdiff_worker_nfe_total gives the network evaluations per second, per "
        "solver, over DURATION (default URL/metrics: the engine's own in embedded mode; with Redis, a "
        "worker's metrics port)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the JSON record to PATH ('-': stdout, the summary then "
        "goes to stderr); without it only the summary is printed",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a URL whose host is not loopback (127.0.0.0/8, ::1, localhost)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal)")


# ---- checks that need no network ------------------------------------------------------------------


def check_url(url: str, allow_remote: bool) -> str | None:
    """None if `url` may be driven, else the reason it may not."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        return f"bad --url {url!r}: {e}"
    if parts.scheme not in ("http", "https") or not host:
        return f"bad --url {url!r}: expected http(s)://HOST[:PORT]"
    if allow_remote:
        return None
    if host.lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"--url {url!r}: host {host!r} is not loopback (127.0.0.0/8, ::1, localhost); "
        "pass --allow-remote to drive a remote service"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_mix(data: Any, where: str = "mix") -> list[dict[str, Any]]:
    """Validate a decoded mix: a non-empty list of {weight, request, name?}. Returns normalised entries
    {name, weight, request: {model, steps, solver, n}}; raises MixError naming the entry and field."""
    if not isinstance(data, list):
        raise MixError(f"{where}: expected a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise MixError(f"{where}: the list of entries is empty")
    entries = [_parse_entry(raw, f"{where}: entry {i}") for i, raw in enumerate(data)]
    seen: dict[str, int] = {}
    for e in entries:  # names label the per-entry figures: make them unique
        k = seen[e["name"]] = seen.get(e["name"], 0) + 1
        if k > 1:
            e["name"] = f"{e['name']}#{k}"
    return entries


def _positive_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _parse_entry(raw: Any, at: str) -> dict[str, Any]:
    """One mix entry, checked and normalised: {name, weight, request, loops?, interval_s?}."""
    if not isinstance(raw, dict):
        raise MixError(f"{at}: expected an object with 'weight' and 'request', got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"weight", "request", "name", "loops", "interval_s"})
    if unknown:
        raise MixError(
            f"{at}: unknown key(s) {', '.join(map(repr, unknown))} (expected weight, request, name, loops, interval_s)"
        )
    weight = raw.get("weight", 1)
    if not _positive_number(weight):
        raise MixError(f"{at}: 'weight' must be a positive number, not {weight!r}")
    if "request" not in raw:
        raise MixError(f"{at}: missing 'request' (an object with model, steps, solver, n)")
    request = _parse_request(raw["request"], at)
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise MixError(f"{at}: 'name' must be a non-empty string, not {name!r}")
    default_name = "/".join(
        [request["model"], request["solver"], str(request["steps"]), f"n{request['n']}"]
        + ([request["priority"]] if "priority" in request else [])
    )
    entry = {"name": name or default_name, "weight": weight, "request": request}
    entry.update(_parse_pacing(raw, at))
    return entry


def _parse_request(req: Any, at: str) -> dict[str, Any]:
    """An entry's request: {model, steps, solver, n, priority?}."""
    if not isinstance(req, dict):
        raise MixError(f"{at}: 'request' must be an object with model, steps, solver, n, not {type(req).__name__}")
    unknown = sorted(set(req) - set(REQUEST_KEYS))
    if unknown:
        raise MixError(
            f"{at}: request has unknown key(s) {', '.join(map(repr, unknown))} "
            f"(expected {', '.join(REQUEST_KEYS)}; seeds come from --seed)"
        )
    for key in ("model", "steps", "solver"):
        if key not in req:
            raise MixError(f"{at}: request is missing {key!r}")
    for key in ("model", "solver"):
        if not isinstance(req[key], str) or not req[key]:
            raise MixError(f"{at}: request {key!r} must be a non-empty string, not {req[key]!r}")
    n = req.get("n", 1)
    for key, v in (("steps", req["steps"]), ("n", n)):
        if not _is_int(v) or v < 1:
            raise MixError(f"{at}: request {key!r} must be an integer of at least 1, not {v!r}")
    request = {"model": req["model"], "steps": req["steps"], "solver": req["solver"], "n": n}
    if "priority" in req:
        if req["priority"] not in PRIORITIES:
            raise MixError(f"{at}: request 'priority' must be one of {', '.join(PRIORITIES)}, not {req['priority']!r}")
        request["priority"] = req["priority"]
    return request


def _parse_pacing(raw: dict[str, Any], at: str) -> dict[str, Any]:
    """An entry's own loops and their interval, if it has them."""
    pacing: dict[str, Any] = {}
    if "loops" in raw:
        if not _is_int(raw["loops"]) or raw["loops"] < 1:
            raise MixError(f"{at}: 'loops' must be an integer of at least 1, not {raw['loops']!r}")
        pacing["loops"] = raw["loops"]
    if "interval_s" in raw:
        v = raw["interval_s"]
        if not _positive_number(v):
            raise MixError(f"{at}: 'interval_s' must be a positive number of seconds, not {v!r}")
        if "loops" not in raw:
            raise MixError(f"{at}: 'interval_s' paces an entry's own loops: give 'loops' too")
        pacing["interval_s"] = float(v)
    return pacing


def load_mix(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MixError(f"mix file {path}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise MixError(f"mix file {path}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MixError(f"mix file {path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return parse_mix(data, f"mix file {path}")


def default_mix(models: list[dict]) -> list[dict[str, Any]]:
    """rk4 10 steps n=1 (weight 3) and ddim 20 steps n=4 (weight 1) on the first served model."""
    if not models:
        raise MixError("the service serves no models (GET /v1/models is empty)")
    name = models[0]["name"]
    solvers = models[0].get("solvers") or ["rk4", "ddim"]
    pick = lambda want: want if want in solvers else solvers[0]  # noqa: E731
    return parse_mix(
        [
            {"weight": 3, "request": {"model": name, "steps": 10, "solver": pick("rk4"), "n": 1}},
            {"weight": 1, "request": {"model": name, "steps": 20, "solver": pick("ddim"), "n": 4}},
        ],
        "default mix",
    )


def check_served(entries: list[dict[str, Any]], models: list[dict], where: str) -> None:
    """Every entry names a served model and a solver it takes (else every such request would be a 422)."""
    served = {m.get("name"): m for m in models}
    for i, e in enumerate(entries):
        req = e["request"]
        if req["model"] not in served:
            raise MixError(
                f"{where}: entry {i}: model {req['model']!r} is not served "
                f"(served: {', '.join(sorted(map(str, served))) or 'none'})"
            )
        solvers = served[req["model"]].get("solvers")
        if solvers and req["solver"] not in solvers:
            raise MixError(f"{where}: entry {i}: solver {req['solver']!r} is not one of {', '.join(solvers)}")


# ---- figures --------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it
    (always an observed value; p50 <= p95 <= p99 <= max). None for no values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(values: list[float]) -> dict[str, float | None]:
    s = sorted(values)
    out = {f"p{p}": _round(percentile(s, p)) for p in (50, 95, 99)}
    out.update(
        min=_round(s[0]) if s else None, max=_round(s[-1]) if s else None, mean=_round(sum(s) / len(s)) if s else None
    )
    return out


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(float(v), digits)


COUNTS = ("started", "finished", "rejected", "failed", "images")


@dataclass
class EntryTally:
    """Outcomes of one mix entry's requests."""

    started: int = 0
    finished: int = 0
    rejected: int = 0
    failed: int = 0
    images: int = 0
    window_images: int = 0  # images of requests finished within the window
    latency_ms: list[float] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in COUNTS}


class Tally:
    """Outcomes of one run, overall and per mix entry."""

    def __init__(self, entries: list[dict[str, Any]]):
        self.entries = entries
        self.per_entry = [EntryTally() for _ in entries]
        self.window_end: float | None = None  # time.monotonic() when the window closes (DURATION)
        self.server: dict[str, list[float]] = {k: [] for k in ("queue_ms", "sample_ms", "encode_ms", "total_ms")}
        self.errors: dict[str, dict[str, Any]] = {}
        self.first_start: float | None = None
        self.last_end: float | None = None

    def started(self, i: int) -> None:
        if self.first_start is None:
            self.first_start = time.monotonic()
        self.per_entry[i].started += 1

    def finished(self, i: int, latency_ms: float, images: int, metrics: dict) -> None:
        e = self.per_entry[i]
        e.finished += 1
        e.images += images
        e.latency_ms.append(latency_ms)
        for k, values in self.server.items():
            if isinstance(metrics.get(k), (int, float)):
                values.append(float(metrics[k]))
        self.last_end = time.monotonic()
        if self.window_end is None or self.last_end <= self.window_end:
            e.window_images += images

    def failed(self, i: int, kind: str, message: str, rejected: bool = False) -> None:
        e = self.per_entry[i]
        if rejected:
            e.rejected += 1
        else:
            e.failed += 1
        err = self.errors.setdefault(kind, {"count": 0, "examples": []})
        err["count"] += 1
        message = message[:300]
        if len(err["examples"]) < MAX_EXAMPLES and message not in err["examples"]:
            err["examples"].append(message)
        self.last_end = time.monotonic()

    def totals(self) -> dict[str, int]:
        return {k: sum(e.counts()[k] for e in self.per_entry) for k in COUNTS}


def classify(exc: BaseException) -> tuple[str, str, bool]:
    """(error kind, message, is a 429 rejection) of a request's exception."""
    from arcdiff.client import APIError

    if isinstance(exc, APIError):
        return str(exc.status_code), exc.message, exc.status_code == 429
    return type(exc).__name__, str(exc) or type(exc).__name__, False


# ---- the run --------------------------------------------------------------------------------------


async def scrape_nfe(http: Any, url: str) -> dict[str, float] | None:
    """arcdiff_worker_nfe_total per model/solver from a Prometheus page (the service's /metrics in
    embedded mode, or a worker's); None when there is none to read."""
    import httpx

    try:
        r = await http.get(url)
        if r.status_code != 200:
            return None
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name == "arcdiff_worker_nfe_total":
                    key = f"{sample.labels.get('model')}/{sample.labels.get('solver')}"
                    out[key] = out.get(key, 0.0) + sample.value
    except (httpx.HTTPError, ImportError, ValueError):
        return None
    return out or None


class _Run:
    """One run of the loops: the request plan, the pacing, the stop on ^C and the NFE window. The
    loops share this state, so it is one object rather than closures in one long function."""

    def __init__(
        self, args: argparse.Namespace, entries: list[dict[str, Any]], client: Any, tally: Tally, progress: Any
    ) -> None:
        import asyncio
        import random

        self.args, self.entries, self.client, self.tally, self.progress = args, entries, client, tally, progress
        self.rng = random.Random(args.seed)
        self.shared = [i for i, e in enumerate(entries) if "loops" not in e]  # what the C shared loops pick from
        self.weights = [entries[i]["weight"] for i in self.shared]
        # an entry with loops of its own draws its seeds from its own stream (its loops' timing then
        # does not change the shared loops' sequence)
        self.own_rngs = {i: random.Random(f"{args.seed}/{i}") for i, e in enumerate(entries) if "loops" in e}
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + args.duration
        self.hard_stop = self.stop_at + args.timeout
        tally.window_end = self.stop_at
        self.started = 0
        self.interrupted = False
        self.stopping = asyncio.Event()
        self.main: Any = None  # the task to cancel on a second ^C

    def plan(self, own: int | None = None) -> tuple[int, int] | None:
        """The next request (entry index, seed), or None when no more may start. Drawn in start order,
        so the sequence depends only on --seed. `own`: an entry with loops of its own."""
        if self.stopping.is_set() or time.monotonic() >= self.stop_at or self.started >= self.args.max_requests:
            return None
        self.started += 1
        if own is not None:
            return own, self.own_rngs[own].randint(0, SEED_MAX)
        return self.shared[self.rng.choices(range(len(self.shared)), self.weights)[0]], self.rng.randint(0, SEED_MAX)

    async def pause(self, seconds: float) -> None:
        """Sleep, but not past DURATION nor past a stop request."""
        import asyncio

        seconds = min(seconds, self.stop_at - time.monotonic())
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), seconds)

    async def request(self, i: int, seed: int) -> float | None:
        """Run one request of entry `i` and count its outcome; returns when it started, or None when
        it failed (a 429 or 503 has then been waited out)."""
        import asyncio

        from arcdiff.client import APIError

        req = self.entries[i]["request"]
        self.tally.started(i)
        t = time.monotonic()
        try:
            result = await self.client.generate(
                req["model"],
                req["steps"],
                req["solver"],
                seed=seed,
                n=req["n"],
                timeout=max(0.01, self.hard_stop - t),
                wait=True,
                priority=req.get("priority"),
            )
        except asyncio.CancelledError:
            self.tally.failed(i, "Cancelled", "still in flight when the run was stopped")
            raise
        except Exception as e:  # every failure is a figure, never a crash of the benchmark
            kind, message, rejected = classify(e)
            self.tally.failed(i, kind, message, rejected)
            self.progress.update(1)
            if isinstance(e, APIError) and e.status_code in (429, 503):
                await self.pause(e.retry_after if e.retry_after is not None else 1.0)
            return None
        self.tally.finished(i, (time.monotonic() - t) * 1000.0, len(result.images), result.metrics)
        self.progress.update(1)
        return t

    async def loop(self, own: int | None = None) -> None:
        interval = self.entries[own].get("interval_s", 0.0) if own is not None else 0.0
        while (nxt := self.plan(own)) is not None:
            t = await self.request(*nxt)
            if t is not None and interval:
                await self.pause(t + interval - time.monotonic())

    def on_sigint(self) -> None:
        if not self.stopping.is_set():  # first ^C: start no more requests, let those in flight finish
            self.interrupted = True
            self.stopping.set()
            print(
                "\narcdiff bench http: interrupted; waiting for requests in flight (^C again to abandon them)",
                file=sys.stderr,
            )
        elif self.main is not None:
            self.main.cancel()

    async def window_nfe(self, scrape: Any) -> dict[str, float] | None:
        """Network evaluations per second, per model/solver, over DURATION (or until a stop)."""
        import asyncio

        if scrape is None:
            return None
        before, t_before = await scrape(), time.monotonic()
        if before is None:
            return None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), max(0.0, self.stop_at - time.monotonic()))
        after, t_after = await scrape(), time.monotonic()
        if after is None:
            return None
        return {k: round((v - before.get(k, 0.0)) / max(1e-9, t_after - t_before), 3) for k, v in sorted(after.items())}

    async def run_loops(self) -> None:
        """Run every loop until each ends (or a second ^C); a bug in a loop is raised."""
        import asyncio
        import signal

        loop_ = asyncio.get_running_loop()
        self.main = asyncio.current_task()
        try:
            loop_.add_signal_handler(signal.SIGINT, self.on_sigint)
            handler = True
        except (NotImplementedError, RuntimeError, ValueError):
            handler = False
        tasks = [asyncio.create_task(self.loop()) for _ in range(self.args.concurrency if self.shared else 0)]
        tasks += [asyncio.create_task(self.loop(i)) for i in self.own_rngs for _ in range(self.entries[i]["loops"])]
        try:
            # each request's own timeout ends at hard_stop; this bound is a backstop
            _done, pending = await asyncio.wait(tasks, timeout=self.hard_stop - time.monotonic() + 5.0)
        except asyncio.CancelledError:
            self.interrupted = True
            pending = {t for t in tasks if not t.done()}
        finally:
            if handler:
                loop_.remove_signal_handler(signal.SIGINT)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and (exc := t.exception()) is not None:
                raise exc  # a bug in the loop itself


async def drive(
    args: argparse.Namespace,
    entries: list[dict[str, Any]],
    client: Any,
    tally: Tally,
    progress: Any,
    scrape: Any = None,
) -> dict[str, Any]:
    """Run the loops; returns timing facts (the outcomes are in `tally`). `scrape`: an async
    callable read at the start and at the end of DURATION (network evaluations done, see
    scrape_nfe)."""
    import asyncio

    run = _Run(args, entries, client, tally, progress)
    nfe_task = asyncio.create_task(run.window_nfe(scrape))
    await run.run_loops()
    try:
        nfe_per_s = await asyncio.wait_for(nfe_task, 15.0)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        nfe_per_s = None
    return {"t0": run.t0, "interrupted": run.interrupted, "nfe_per_s": nfe_per_s}


async def _main(
    args: argparse.Namespace, api_key: str | None, entries: list[dict[str, Any]] | None
) -> tuple[int, dict[str, Any] | None]:
    import httpx

    from arcdiff.client import APIError, AsyncClient, Unreachable

    # one connection per loop (httpx's default pool holds 100); no retries: overload is counted
    loops = args.concurrency + sum(e.get("loops", 0) for e in entries or [])
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=loops + 1, max_keepalive_connections=loops + 1)
    )
    async with AsyncClient(args.url, api_key, max_retries=0, transport=transport) as client:
        try:
            models = await client.models()
        except Unreachable as e:
            print(f"arcdiff bench http: {e}", file=sys.stderr)
            return 1, None
        except APIError as e:
            print(
                f"arcdiff bench http: GET {args.url.rstrip('/')}/v1/models answered {e.status_code}: {e.message}",
                file=sys.stderr,
            )
            return 1, None
        try:
            if entries is not None:
                check_served(entries, models, f"mix file {args.mix}")
            else:
                entries = default_mix(models)
        except MixError as e:
            print(f"arcdiff bench http: {e}", file=sys.stderr)
            return 2, None

        tally = Tally(entries)
        progress = _progress(args)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with httpx.AsyncClient(headers=headers, timeout=10.0) as http:
            metrics_url = args.metrics_url or args.url.rstrip("/") + "/metrics"
            try:
                facts = await drive(args, entries, client, tally, progress, lambda: scrape_nfe(http, metrics_url))
            finally:
                progress.close()
    return 0, {"entries": entries, "tally": tally, "models": [m.get("name") for m in models], **facts}


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(args: argparse.Namespace) -> Any:
    if args.no_progress or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=None, unit="req", desc="bench http", file=sys.stderr, dynamic_ncols=True)


def build_record(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    from arcdiff.bench.report import environment

    tally: Tally = out["tally"]
    totals = tally.totals()
    end = tally.last_end or time.monotonic()
    wall = max(1e-9, end - (tally.first_start or out["t0"]))
    latencies = [v for e in tally.per_entry for v in e.latency_ms]
    per_entry = []
    for entry, t in zip(out["entries"], tally.per_entry, strict=True):
        lat = latency_summary(t.latency_ms)
        per_entry.append(
            {
                "name": entry["name"],
                "weight": entry["weight"],
                "request": entry["request"],
                **{k: entry[k] for k in ("loops", "interval_s") if k in entry},
                **t.counts(),
                "latency_ms": {k: lat[k] for k in ("p50", "p95", "p99", "max")},
                # images of requests finished in the first DURATION seconds, over DURATION
                "images_per_s": round(t.window_images / args.duration, 4),
            }
        )
    try:
        env = environment()
    except ImportError:  # a client machine without torch
        import platform

        env = {"python": platform.python_version(), "machine": platform.machine()}
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "api_key", "command", "bench")}
    settings["api_key"] = bool(args.api_key or os.environ.get("ARCDIFF_API_KEY"))  # whether one was sent, never the key
    return {
        "bench": "http",
        "url": args.url,
        "models": out["models"],
        "requests": {**totals, "unfinished": totals["rejected"] + totals["failed"]},
        "errors": dict(sorted(tally.errors.items(), key=lambda kv: -kv[1]["count"])),
        "wall_s": round(wall, 3),
        "throughput": {
            "requests_per_s": round(totals["finished"] / wall, 3),
            "images_per_s": round(totals["images"] / wall, 3),
        },
        # client-side, submit to images received, finished requests only; nearest-rank percentiles
        "latency_ms": latency_summary(latencies),
        "percentiles": "nearest-rank",
        # the server's latency record of the finished generations: medians (nearest-rank)
        "server_ms": {f"{k}_p50": _round(percentile(sorted(v), 50)) for k, v in tally.server.items()},
        # from the service's metrics: network evaluations per second per model/solver over DURATION
        "nfe_per_s": out.get("nfe_per_s"),
        "per_entry": per_entry,
        "interrupted": out["interrupted"],
        "args": settings,
        "environment": env,
    }


def summary(record: dict[str, Any]) -> str:
    from arcdiff.bench.report import table

    cols = ["entry", "weight", "started", "finished", "rejected", "failed", "images", "p50_ms", "p95_ms", "p99_ms"]
    cols.append("images/s")
    rows = [
        {
            "entry": e["name"],
            "weight": f"{e['loops']} loops" if "loops" in e else e["weight"],
            **{k: e[k] for k in cols[2:7]},
            **{f"{p}_ms": e["latency_ms"][p] for p in ("p50", "p95", "p99")},
            "images/s": e["images_per_s"],
        }
        for e in record["per_entry"]
    ]
    r, lat = record["requests"], record["latency_ms"]
    rows.append({"entry": "all", **{k: r[k] for k in cols[2:7]}, **{f"{p}_ms": lat[p] for p in ("p50", "p95", "p99")}})
    th, srv = record["throughput"], record["server_ms"]
    lines = [
        table(rows, cols),
        "",
        f"{record['url']}: {r['finished']} finished in {record['wall_s']:.2f} s: "
        f"{th['requests_per_s']:.3g} requests/s, {th['images_per_s']:.3g} images/s; "
        f"latency max {lat['max']} ms; server median queue {srv['queue_ms_p50']} ms, "
        f"sample {srv['sample_ms_p50']} ms",
    ]
    if record.get("nfe_per_s"):
        lines.append(
            "network evaluations/s over the duration: "
            + ", ".join(f"{k} {v:.4g}" for k, v in record["nfe_per_s"].items() if v)
        )
    for kind, err in record["errors"].items():
        lines.append(f"errors {kind}: {err['count']}, e.g. {err['examples'][0]!r}")
    if record["interrupted"]:
        lines.append("interrupted: the figures cover the part that ran")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import asyncio

    problem = check_url(args.url, args.allow_remote)
    if problem:
        print(f"arcdiff bench http: {problem}", file=sys.stderr)
        return 2
    entries = None
    if args.mix:  # a bad file is reported before the service is contacted
        try:
            entries = load_mix(args.mix)
        except MixError as e:
            print(f"arcdiff bench http: {e}", file=sys.stderr)
            return 2
    api_key = args.api_key or os.environ.get("ARCDIFF_API_KEY") or None
    try:
        code, out = asyncio.run(_main(args, api_key, entries))
    except KeyboardInterrupt:
        print("arcdiff bench http: interrupted before the run started", file=sys.stderr)
        return 130
    if out is None:
        return code
    record = build_record(args, out)
    text = summary(record)
    print(text, file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    if args.json:
        from arcdiff.bench.report import write_json

        write_json(record, args.json)
    if record["requests"]["finished"] == 0:
        print("arcdiff bench http: no request finished", file=sys.stderr)
        return 1
    return 0
