"""Several API processes behind one port: their metrics are merged (prometheus-client multiprocess mode)."""

import re

import httpx
from servicekit import free_port, start_api, stop, wait_until


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _healthz_count(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("arcdiff_http_requests_total{") and 'route="/healthz"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_api_processes_merge_their_metrics(tmp_path, model_dir, redis_url):
    port = free_port()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    (prom_dir / "counter_999999.db").write_bytes(b"stale")  # from an earlier run: must be wiped at start
    api = start_api(
        port,
        model_dir,
        tmp_path / "api.log",
        redis_url=redis_url,
        ARCDIFF_API_WORKERS="2",
        PROMETHEUS_MULTIPROC_DIR=str(prom_dir),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(base + "/healthz"), 60, "the API")
        # both processes must be up: their metric files appear once they import the metrics
        wait_until(
            lambda: len({m.group(1) for f in prom_dir.glob("*.db") if (m := re.search(r"_(\d+)\.db$", f.name))}) >= 2,
            60,
            "two API processes",
        )
        before = _healthz_count(httpx.get(base + "/metrics", timeout=5).text)
        for _ in range(30):  # a new connection each time, so the kernel spreads them over the processes
            assert httpx.get(base + "/healthz", timeout=5).status_code == 200
        after = _healthz_count(httpx.get(base + "/metrics", timeout=5).text)
        assert after - before == 30, (before, after)
        assert not (prom_dir / "counter_999999.db").exists()
    finally:
        stop(api)


def test_several_processes_need_redis(tmp_path, model_dir):
    api = start_api(free_port(), model_dir, tmp_path / "api.log", ARCDIFF_API_WORKERS="2")
    assert api.wait(60) == 2
    assert "needs --redis" in (tmp_path / "api.log").read_text()
