"""`arcdiff serve`: the HTTP API; with no Redis URL it runs the engine in-process (embedded mode)."""

from __future__ import annotations

import argparse
import sys

from service.commands._common import add_engine_flags, settings_from, setup_logging

HELP = """Run the HTTP API (POST /v1/generations, GET /v1/models, /healthz, /readyz, /metrics).

Without a Redis URL the same continuous-batching engine runs in this process (embedded mode):
one command gives a working service. With --redis URL (or ARCDIFF_REDIS_URL) the API only
enqueues, and `arcdiff worker` processes do the sampling.

Every flag overrides its ARCDIFF_ environment variable; see docs/service.md for all settings."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (embedded engine, or enqueue to Redis)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, metavar="P", help="port (ARCDIFF_PORT; default 8000)")
    p.add_argument("--host", metavar="H", help="address (ARCDIFF_HOST; default 127.0.0.1, use 0.0.0.0 in containers)")
    p.add_argument("--redis", metavar="URL", help="Redis URL, e.g. redis://localhost:6379/0 (ARCDIFF_REDIS_URL); "
                                                  "unset: embedded mode")
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="serve only this model (repeatable; ARCDIFF_MODELS; default: all)")
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import SetupError, create_app
    from service.settings import Settings

    settings = settings_from(Settings, port=args.port, host=args.host, redis_url=args.redis, models=args.models,
                             device=args.device, max_batch=args.max_batch, model_dir=args.model_dir,
                             log_level=args.log_level)
    setup_logging(settings.log_level)
    try:
        app = create_app(settings)
    except SetupError as e:
        print(f"arcdiff serve: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0
