"""The image's healthcheck (deploy/docker/healthcheck.py) probes the port of the container's own
command, so `serve --port 18000` or a worker's `--metrics-port` need no extra setting. The smoke
test (deploy/smoke/run.sh) runs it in real containers; here its choice of URL is checked."""

from __future__ import annotations

import importlib.util
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from deploy_helpers import ROOT

spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "docker" / "healthcheck.py")
assert spec and spec.loader
healthcheck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(healthcheck)
ARCDIFF = ["/opt/conda/bin/python", "/opt/conda/bin/arcdiff"]


@pytest.mark.parametrize(
    ("argv", "env", "url"),
    [
        ([*ARCDIFF, "serve", "--host", "0.0.0.0", "--port", "8000"], {}, "http://127.0.0.1:8000/healthz"),
        ([*ARCDIFF, "serve", "--host", "0.0.0.0", "--port", "18000"], {}, "http://127.0.0.1:18000/healthz"),
        ([*ARCDIFF, "serve", "--port=18001"], {}, "http://127.0.0.1:18001/healthz"),
        ([*ARCDIFF, "serve"], {"ARCDIFF_PORT": "9000"}, "http://127.0.0.1:9000/healthz"),
        ([*ARCDIFF, "serve", "--host", "::1", "--port", "80"], {}, "http://[::1]:80/healthz"),
        ([*ARCDIFF, "worker", "--model", "mnist", "--metrics-port", "9102"], {}, "http://127.0.0.1:9102/metrics"),
        ([*ARCDIFF, "worker"], {"ARCDIFF_WORKER_METRICS_PORT": "9200"}, "http://127.0.0.1:9200/metrics"),
        ([*ARCDIFF, "worker", "--model", "mnist"], {}, "http://127.0.0.1:9101/metrics"),
        # the flag wins over the environment, as in the CLI
        ([*ARCDIFF, "serve", "--port", "7000"], {"ARCDIFF_PORT": "9000"}, "http://127.0.0.1:7000/healthz"),
        ([*ARCDIFF, "serve", "--port", "7000"], {"HEALTHCHECK_URL": "http://x:1/y"}, "http://x:1/y"),
    ],
)
def test_probe_url_follows_the_command(argv, env, url):
    assert healthcheck.probe_url(argv, env) == url


@pytest.mark.parametrize(
    "argv",
    [[*ARCDIFF, "worker", "--metrics-port", "0"], [*ARCDIFF, "generate", "--model", "mnist"], ["/bin/sh"]],
)
def test_nothing_to_probe_is_said(argv):
    with pytest.raises(healthcheck.NoProbe):
        healthcheck.probe_url(argv, {})


def test_ok_reads_the_answer():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert healthcheck.ok(f"http://127.0.0.1:{port}/healthz")
        assert not healthcheck.ok(f"http://127.0.0.1:{port}/readyz")
    finally:
        server.shutdown()
