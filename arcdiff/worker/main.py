"""`arcdiff worker`: load the models once, start the engine and its metrics, serve the RQ queues."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import torch

from arcdiff.model.registry import ModelRegistry
from arcdiff.worker.device_thread import DeviceThread
from arcdiff.worker.engine import Engine, EngineConfig
from arcdiff.worker.loading import prepare_models, resolve_device, resolve_speed
from arcdiff.worker.settings import EngineSettings, WorkerSettings

log = logging.getLogger("arcdiff.worker")


class WorkerSetupError(RuntimeError):
    """The worker cannot start (unknown model, no Redis URL, bad device); the message says why."""


def default_worker_name() -> str:
    """host.pid.random: unique per process, readable in `rq info`."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


def build_engine(settings: EngineSettings, models: list[str], worker_name: str = "") -> Engine:
    """Load `models` from the registry onto the configured device and wrap them in an engine."""
    registry = ModelRegistry(settings.model_dir)
    # a folder whose config.json cannot be read is in registry.errors: it failed to load, it is not unknown
    unknown = [name for name in models if name not in registry.models and name not in registry.errors]
    if unknown:
        known = ", ".join(registry.names()) or "none"
        raise WorkerSetupError(f"unknown model(s) {', '.join(unknown)} in {registry.root}; known: {known}")
    if not models:
        raise WorkerSetupError(f"no models to serve in {registry.root}")
    device = resolve_device(settings.device)
    failed: dict[str, str] = {}
    for name in models:
        if name in registry.errors:
            failed[name] = registry.errors[name]
            log.error("model %s failed to load, not serving it: %s", name, failed[name])
    loadable = [name for name in models if name not in failed]
    speed = resolve_speed(device, settings.amp, settings.compile, settings.channels_last)
    # every torch call of this process from here on runs on one thread (see arcdiff/worker/device_thread.py)
    device_thread = DeviceThread()
    threads = settings.engine_threads(device.type)
    if threads:
        device_thread.call(torch.set_num_threads, threads)
    prepared = device_thread.call(prepare_models, registry, loadable, device, speed, failed=failed)
    if not prepared:
        device_thread.shutdown()
        raise WorkerSetupError("no model could be loaded: " + "; ".join(f"{n}: {why}" for n, why in failed.items()))
    config = EngineConfig(
        device=device,
        max_batch=settings.max_batch,
        encode_threads=settings.encode_threads,
        worker=worker_name,
        job_timeout_s=settings.job_timeout_s,
        queue_timeout_s=settings.queue_timeout_s,
        warm_up=speed.compile != "none",
        tick_budget=settings.tick_budget,
        tick_budget_min_s=settings.tick_budget_min_ms / 1000.0,
        batch_min_share=settings.batch_min_share,
        max_images_per_key=settings.max_images_per_key,
        recompile_stance="eager_on_recompile" if speed.compile != "none" else None,
    )
    return Engine(prepared, config, failed_models=failed, device_thread=device_thread)


def run_worker(settings: WorkerSettings, models: list[str]) -> int:
    """Serve the queues of `models` until stopped; returns the exit code."""
    import redis
    from prometheus_client import start_http_server

    from arcdiff.worker.rq_worker import BatchingWorker

    if not settings.redis_url:
        raise WorkerSetupError("a worker needs a Redis URL: --redis URL or ARCDIFF_REDIS_URL")
    name = settings.worker_name or default_worker_name()
    if settings.worker_metrics_port:
        # before the models load: a taken port fails now, in one line, not after minutes of loading
        # and compiling; and the probes of compose and Kubernetes watch this port during the
        # warm-up (arcdiff_worker_up stays 0 until jobs are taken)
        try:
            start_http_server(settings.worker_metrics_port)
        except OSError as e:
            raise WorkerSetupError(
                f"metrics port {settings.worker_metrics_port} is not free ({e.strerror}): give each worker on a host "
                "its own --metrics-port (ARCDIFF_WORKER_METRICS_PORT), or 0 for no metrics"
            ) from None
        log.info("worker metrics on :%d/metrics", settings.worker_metrics_port)
    engine = build_engine(settings, models, worker_name=name)
    connection = redis.Redis.from_url(settings.redis_url)
    connection.ping()  # fail now, with the URL in the message, rather than inside RQ's loop
    engine.start()  # warms up (compiles) first: the worker takes jobs only for what it serves
    worker = BatchingWorker(
        engine,
        drain_timeout_s=settings.drain_timeout_s,
        heartbeat_s=settings.heartbeat_s,
        events_ttl_s=settings.result_ttl_s,
        connection=connection,
        name=name,
        default_result_ttl=settings.result_ttl_s,
        worker_ttl=settings.worker_ttl_s,
        maintenance_interval=settings.maintenance_s,
    )
    log.info(
        "worker %s serving %s on %s (max batch %d)", name, ", ".join(engine.models), engine.device, engine.max_batch
    )
    for model, why in engine.failed_models.items():
        log.error(
            "worker %s does NOT serve %s (failed to load: %s); its jobs stay queued for other workers", name, model, why
        )
    try:
        worker.work(logging_level=settings.log_level)
    finally:
        engine.close()
    return 0
