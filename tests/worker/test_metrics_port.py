"""A worker whose metrics port is taken (two workers on one host, both on the default 9101) stops
at once with one line naming the setting, before it loads any model."""

from __future__ import annotations

import socket
import subprocess
import sys


def test_taken_metrics_port_is_one_line_before_any_model_loads(tmp_path):
    # a model folder that fails to load: had the worker got as far as loading, it would say so
    broken = tmp_path / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{ not json")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "arcdiff.cli.main", "worker", "--model", "broken", "--device", "cpu",
             "--redis", "redis://127.0.0.1:1/0", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120,
            env={"ARCDIFF_MODEL_DIR": str(tmp_path / "models"), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("arcdiff worker:")]
    assert len(errors) == 1, done.stderr
    assert f"metrics port {port} is not free" in errors[0]
    assert "--metrics-port" in errors[0] and "ARCDIFF_WORKER_METRICS_PORT" in errors[0]
    assert "broken" not in done.stderr, "the worker tried to load its models first"
