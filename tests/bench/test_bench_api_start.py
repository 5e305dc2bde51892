"""`arcdiff bench api-start`: it starts a Redis-mode API, reports its start time and memory."""

import json
import subprocess
import sys

from servicekit import REPO, child_env


def test_api_start_reports_time_and_memory(model_dir, redis_url, tmp_path):
    out = tmp_path / "api-start.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "arcdiff.cli",
            "bench",
            "api-start",
            "--redis",
            redis_url,
            "--runs",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=child_env(model_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "start to /readyz" in r.stdout and "RSS after /v1/models" in r.stdout
    figures = json.loads(out.read_text())
    assert len(figures["ready_s"]) == 1 and 0 < figures["ready_s"][0] < 120
    # no torch: well under the 265 MiB a torch-importing API process held (docs/performance.md)
    assert 10 < figures["rss_mib"][0] < 150
