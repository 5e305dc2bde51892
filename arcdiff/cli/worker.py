"""`arcdiff worker`: load models once and serve their Redis queues with continuous batching."""

from __future__ import annotations

import argparse
import sys

from arcdiff.cli._common import add_engine_flags, engine_flags, settings_from, setup_logging

HELP = """Serve the queues of the given models (arcdiff:<model>, then arcdiff:<model>:batch).

The models load once; every job's images join one running batch per model at the next network
evaluation, whatever their steps and solver. Jobs keep an honest RQ lifecycle (started with
heartbeats, finished with the result, failed with the reason; see `rq info`). SIGTERM stops
taking jobs, lets running ones finish (ARCDIFF_DRAIN_TIMEOUT_S, default 25 s) and requeues the
rest; a second SIGTERM requeues at once. Run one worker per GPU, on as many hosts as you like,
against one Redis.

Every flag overrides its ARCDIFF_ environment variable; see docs/configuration.md."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="serve generation queues from Redis on one device",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="model to serve (repeatable; ARCDIFF_MODELS; default: all in the model folder)",
    )
    p.add_argument("--redis", metavar="URL", help="Redis URL (ARCDIFF_REDIS_URL); required")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="Prometheus port (ARCDIFF_WORKER_METRICS_PORT; default 9101; 0: off)",
    )
    p.add_argument("--name", metavar="NAME", help="worker name in RQ (ARCDIFF_WORKER_NAME; default host.pid.xxxxxx)")
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.worker.main import WorkerSetupError, run_worker
    from arcdiff.worker.settings import WorkerSettings

    settings = settings_from(
        WorkerSettings,
        models=args.models,
        redis_url=args.redis,
        **engine_flags(args),
        worker_metrics_port=args.metrics_port,
        worker_name=args.name,
    )
    setup_logging(settings.log_level)
    models = settings.models or ModelRegistry(settings.model_dir).names()
    try:
        return run_worker(settings, models)
    except (WorkerSetupError, RuntimeError, ConnectionError) as e:
        print(f"arcdiff worker: {e}", file=sys.stderr)
        return 2
