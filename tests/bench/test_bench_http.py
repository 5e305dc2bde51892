"""`arcdiff bench http` against a real `arcdiff serve` (embedded mode, tiny models, uvicorn on a free
port), run as the console command would be: the JSON record adds up, a bad mix file or a remote URL
is refused with exit 2, and a service whose queue is full answers 429s that are counted as rejected."""

import json
import subprocess
import sys

import httpx
import pytest
from servicekit import REPO, child_env, free_port, start_api, stop, wait_api_ready

pytestmark = pytest.mark.timeout(180)

MIX = [
    {"weight": 3, "request": {"model": "tiny", "steps": 2, "solver": "euler", "n": 1}},
    {"weight": 1, "request": {"model": "tiny-eps", "steps": 3, "solver": "ddim", "n": 3}, "name": "ddim-x3"},
]


def bench(model_dir, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "arcdiff.cli", "bench", "http", "--no-progress", *flags],
        cwd=REPO,
        env=child_env(model_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def api(model_dir, tmp_path):
    """Start an API with the given ARCDIFF_ settings; stopped at the end of the test."""
    started = []

    def start(**env: str) -> str:
        port, log = free_port(), tmp_path / f"api{len(started)}.log"
        proc = start_api(port, model_dir, log, ARCDIFF_TORCH_THREADS="1", **env)
        started.append((proc, log))
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            wait_api_ready(proc, http, log)
        return base

    yield start
    for proc, log in started:
        stop(proc)
        print(log.read_text()[-2000:])


def write_mix(path, mix) -> str:
    path.write_text(json.dumps(mix))
    return str(path)


def test_bench_record_adds_up(api, model_dir, tmp_path):
    base = api()
    out = tmp_path / "out" / "bench.json"
    r = bench(
        model_dir,
        "--url",
        base,
        "--concurrency",
        "4",
        "--duration",
        "3",
        "--mix",
        write_mix(tmp_path / "mix.json", MIX),
        "--json",
        str(out),
        "--seed",
        "5",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    req, lat = rec["requests"], rec["latency_ms"]
    assert req["finished"] > 0 and req["failed"] == req["rejected"] == 0 and rec["errors"] == {}
    assert req["started"] == req["finished"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert rec["percentiles"] == "nearest-rank" and rec["url"] == base and rec["models"] == ["tiny", "tiny-eps"]

    entries = {e["name"]: e for e in rec["per_entry"]}
    assert list(entries) == ["tiny/euler/2/n1", "ddim-x3"]
    assert entries["ddim-x3"]["request"] == MIX[1]["request"]
    for key in ("started", "finished", "rejected", "failed", "images"):
        assert sum(e[key] for e in entries.values()) == req[key], key
    assert req["images"] == sum(e["finished"] * e["request"]["n"] for e in entries.values())
    assert all(e["finished"] > 0 for e in entries.values()), "4 concurrent loops for 3 s pick both entries"

    assert 0 < rec["wall_s"] < 3 + 30
    assert rec["throughput"]["requests_per_s"] == pytest.approx(req["finished"] / rec["wall_s"], rel=0.01)
    assert rec["throughput"]["images_per_s"] == pytest.approx(req["images"] / rec["wall_s"], rel=0.01)
    srv = rec["server_ms"]
    assert srv["queue_ms_p50"] >= 0 and srv["sample_ms_p50"] > 0 and srv["total_ms_p50"] <= lat["max"]
    assert rec["args"]["concurrency"] == 4 and rec["args"]["api_key"] is False and "torch" in rec["environment"]
    # the summary table goes to stdout
    assert "ddim-x3" in r.stdout and "requests/s" in r.stdout


def test_entries_with_loops_of_their_own_and_priorities(api, model_dir, tmp_path):
    """An interactive request every 0.5 s on a loop of its own beside two loops of batch requests:
    per entry its latency and its images per second in the window, the priority sent along."""
    base = api()
    mix = [
        {"loops": 1, "interval_s": 0.5, "request": {"model": "tiny", "steps": 2, "solver": "euler"}},
        {"loops": 2, "request": {"model": "tiny", "steps": 30, "solver": "ddim", "n": 2, "priority": "batch"}},
    ]
    r = bench(model_dir, "--url", base, "-d", "3", "--json", "-", "--mix", write_mix(tmp_path / "mix.json", mix))
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    inter, batch = rec["per_entry"]
    assert inter["name"] == "tiny/euler/2/n1" and batch["name"] == "tiny/ddim/30/n2/batch"
    assert (inter["loops"], inter["interval_s"], batch["loops"]) == (1, 0.5, 2)
    assert batch["request"]["priority"] == "batch" and "priority" not in inter["request"]
    assert 3 <= inter["started"] <= 7, inter  # one loop, one start per 0.5 s at most, for 3 s
    assert inter["finished"] > 0 and batch["finished"] > 0 and rec["requests"]["failed"] == 0
    for e in (inter, batch):
        assert 0 < e["images_per_s"] <= e["images"] / 3 + 1e-9
        assert e["latency_ms"]["p50"] <= e["latency_ms"]["p95"]
    assert "images/s" in r.stderr and "2 loops" in r.stderr
    # the engine's own count of network evaluations (embedded: on the API's /metrics), per solver
    nfe = rec["nfe_per_s"]
    assert nfe["tiny/ddim"] > 0 and nfe["tiny/euler"] > 0 and "network evaluations/s" in r.stderr
    assert nfe["tiny/euler"] == pytest.approx(2 * inter["finished"] / 3, rel=0.5)


def test_refused_before_any_request(model_dir, tmp_path):
    bad = [
        ([{"weight": 1, "request": {"model": "tiny", "solver": "euler"}}], "entry 0: request is missing 'steps'"),
        ([MIX[0], {"weight": -2, "request": MIX[0]["request"]}], "entry 1: 'weight' must be a positive number"),
        ([], "the list of entries is empty"),
        ([{"weight": 1, "request": {**MIX[0]["request"], "n": "4"}}], "entry 0: request 'n' must be an integer"),
        ([{"request": {**MIX[0]["request"], "priority": "urgent"}}], "entry 0: request 'priority' must be one of"),
        ([{"request": MIX[0]["request"], "interval_s": 1}], "entry 0: 'interval_s' paces an entry's own loops"),
        ([{"request": MIX[0]["request"], "loops": 0}], "entry 0: 'loops' must be an integer of at least 1"),
    ]
    port = free_port()  # nothing listens there: a mix problem is reported before the service is contacted
    for k, (mix, message) in enumerate(bad):
        r = bench(model_dir, "--url", f"http://127.0.0.1:{port}", "--mix", write_mix(tmp_path / f"{k}.json", mix))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (mix, r.stderr)

    (tmp_path / "not.json").write_text("[{'weight': 1}]")
    r = bench(model_dir, "--url", f"http://127.0.0.1:{port}", "--mix", str(tmp_path / "not.json"))
    assert r.returncode == 2 and "not JSON" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = bench(model_dir, "--url", f"http://127.0.0.1:{port}", "--mix", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "missing.json: cannot read it" in r.stderr, r.stderr

    r = bench(model_dir, "--url", "http://10.1.2.3:8000", "--duration", "1")
    assert r.returncode == 2 and "not loopback" in r.stderr and "--allow-remote" in r.stderr, r.stderr

    # a loopback URL where nothing listens: exit 1 with the reason
    r = bench(model_dir, "--url", f"http://localhost:{port}", "--duration", "1")
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_full_queue_is_counted_as_rejected(api, model_dir, tmp_path):
    """Batch of one, queue of one: six loops keep the queue full, so most of them get 429."""
    base = api(ARCDIFF_MAX_BATCH="1", ARCDIFF_QUEUE_LIMIT="1")
    mix = [
        {"request": {"model": "tiny", "steps": 40, "solver": "ddim", "n": 1}},
        {"request": {"model": "no-such-model", "steps": 1, "solver": "euler"}},
    ]
    r = bench(model_dir, "--url", base, "--mix", write_mix(tmp_path / "unserved.json", mix))
    assert r.returncode == 2 and "entry 1: model 'no-such-model' is not served" in r.stderr, r.stderr

    r = bench(
        model_dir,
        "--url",
        base,
        "-c",
        "6",
        "-d",
        "2",
        "--json",
        "-",
        "--mix",
        write_mix(tmp_path / "mix.json", mix[:1]),
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)  # with --json - the record alone is on stdout, the summary on stderr
    req = rec["requests"]
    assert req["finished"] > 0 and req["rejected"] > 0 and req["failed"] == 0, rec
    assert req["started"] == req["finished"] + req["rejected"]
    assert set(rec["errors"]) == {"429"} and rec["errors"]["429"]["count"] == req["rejected"]
    assert rec["errors"]["429"]["examples"] and "429" in r.stderr and "rejected" in r.stderr
    # a rejected loop waits Retry-After (1 s) before its next request: no hammering
    assert req["rejected"] <= 6 * 3, req
