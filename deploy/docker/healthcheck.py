"""Container healthcheck for the arcdiff image (API and worker share the image).

Exit 0 when the process in this container answers over HTTP, 1 otherwise. Which URL is checked:
  HEALTHCHECK_URL when set (docker-compose.yml sets it per service); otherwise the API's
  http://127.0.0.1:8000/healthz, then the worker's /metrics on ARCDIFF_WORKER_METRICS_PORT
  (default 9101): a container runs one or the other. (No ARCDIFF_ prefix on HEALTHCHECK_URL: it
  is not a service setting.)
Standard library only, so it works before and after the project's own imports would.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except Exception as e:  # noqa: BLE001 - any failure means unhealthy
        print(f"{url}: {e}", file=sys.stderr)
        return False


def main() -> int:
    explicit = os.environ.get("HEALTHCHECK_URL", "")
    if explicit:
        return 0 if ok(explicit) else 1
    api = "http://127.0.0.1:8000/healthz"
    worker = f"http://127.0.0.1:{os.environ.get('ARCDIFF_WORKER_METRICS_PORT') or 9101}/metrics"
    return 0 if ok(api) or ok(worker) else 1


if __name__ == "__main__":
    sys.exit(main())
