"""`arcdiff serve`: the HTTP API; with no Redis URL it runs the engine in-process (embedded mode)."""

from __future__ import annotations

import argparse
import sys

from arcdiff.cli._common import add_engine_flags, engine_flags, settings_from, setup_logging

HELP = """Run the HTTP API (POST /v1/generations, GET /v1/models, /healthz, /readyz, /metrics).

Without a Redis URL the same continuous-batching engine runs in this process (embedded mode):
one command gives a working service. With --redis URL (or ARCDIFF_REDIS_URL) the API only
enqueues, and `arcdiff worker` processes do the sampling.

Every flag overrides its ARCDIFF_ environment variable; see docs/configuration.md."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP API (embedded engine, or enqueue to Redis)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, metavar="P", help="port (ARCDIFF_PORT; default 8000)")
    p.add_argument("--host", metavar="H", help="address (ARCDIFF_HOST; default 127.0.0.1, use 0.0.0.0 in containers)")
    p.add_argument(
        "--redis",
        metavar="URL",
        help="Redis URL, e.g. redis://localhost:6379/0 (ARCDIFF_REDIS_URL); unset: embedded mode",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="API processes (ARCDIFF_API_WORKERS; default 1); more than "
        "one needs --redis, and their metrics are merged with prometheus-client's multiprocess mode",
    )
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="serve only this model (repeatable; ARCDIFF_MODELS; default: all)",
    )
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from arcdiff.service.app import SetupError, create_app
    from arcdiff.service.settings import Settings

    flags = dict(
        port=args.port,
        host=args.host,
        redis_url=args.redis,
        models=args.models,
        **engine_flags(args),
        api_workers=args.workers,
    )
    settings = settings_from(Settings, **flags)
    setup_logging(settings.log_level)
    if settings.api_workers > 1:
        return run_processes(settings, flags)
    try:
        app = create_app(settings)
    except SetupError as e:
        print(f"arcdiff serve: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


def run_processes(settings, flags: dict) -> int:
    """Several uvicorn processes behind one port. Each builds its app from the environment, so the
    flags are passed on as ARCDIFF_ variables; their metrics go through prometheus-client's
    multiprocess mode (a shared folder of per-process files, emptied at start as its docs say)."""
    import os
    import tempfile
    from pathlib import Path

    import uvicorn

    from arcdiff.service.app import SetupError, served_models

    if settings.embedded:
        print("arcdiff serve: --workers > 1 needs --redis (the embedded engine lives in one process)", file=sys.stderr)
        return 2
    try:
        served_models(settings)  # fail here, once, rather than in every process
    except SetupError as e:
        print(f"arcdiff serve: {e}", file=sys.stderr)
        return 2
    for name, value in flags.items():
        if value is not None:
            os.environ[f"ARCDIFF_{name.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    prom_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="arcdiff-prometheus-")
    Path(prom_dir).mkdir(parents=True, exist_ok=True)
    for f in Path(prom_dir).glob("*.db"):
        f.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    uvicorn.run(
        "arcdiff.service.app:create_app",
        factory=True,
        workers=settings.api_workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )
    return 0
