"""Container healthcheck for the arcdiff image (API and worker share the image).

Exit 0 when the process this container runs answers over HTTP, 1 otherwise (with the reason on
stderr). Which URL: HEALTHCHECK_URL when set; otherwise it follows the container's command, read
from /proc/1/cmdline (the image's ENTRYPOINT runs `arcdiff` as PID 1):
  `arcdiff serve`  -> http://HOST:PORT/healthz, PORT from --port, else ARCDIFF_PORT, else 8000
  `arcdiff worker` -> http://127.0.0.1:PORT/metrics, PORT from --metrics-port, else
                      ARCDIFF_WORKER_METRICS_PORT, else 9101 (0: the worker serves no metrics)
so `serve --port 18000` is probed on 18000 without further settings. (No ARCDIFF_ prefix on
HEALTHCHECK_URL: it is not a service setting.) Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence

DEFAULT_API_PORT = 8000
DEFAULT_METRICS_PORT = 9101


class NoProbe(Exception):
    """The command serves nothing this check can probe."""


def flag(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in argv (the last one wins, as with argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def probe_url(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The URL that tells whether the process started with `argv` is healthy."""
    if env.get("HEALTHCHECK_URL"):
        return env["HEALTHCHECK_URL"]
    command = next((a for a in argv if a in ("serve", "worker")), None)
    if command == "worker":
        port = flag(argv, "--metrics-port") or env.get("ARCDIFF_WORKER_METRICS_PORT") or str(DEFAULT_METRICS_PORT)
        if int(port) == 0:
            raise NoProbe("the worker runs with no metrics port (0): set HEALTHCHECK_URL or a --metrics-port")
        return f"http://127.0.0.1:{int(port)}/metrics"
    if command == "serve" or not argv:
        port = flag(argv, "--port") or env.get("ARCDIFF_PORT") or str(DEFAULT_API_PORT)
        host = flag(argv, "--host") or env.get("ARCDIFF_HOST") or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{int(port)}/healthz"
    raise NoProbe(f"the container runs `{' '.join(argv)}`, neither `arcdiff serve` nor `arcdiff worker`")


def pid1_argv() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except Exception as e:  # any failure means unhealthy
        print(f"{url}: {e}", file=sys.stderr)
        return False


def main() -> int:
    try:
        url = probe_url(pid1_argv(), os.environ)
    except (NoProbe, ValueError) as e:
        print(f"arcdiff-healthcheck: {e}", file=sys.stderr)
        return 1
    return 0 if ok(url) else 1


if __name__ == "__main__":
    sys.exit(main())
