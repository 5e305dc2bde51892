"""Prometheus metrics of the engine and the RQ worker (names are a contract with deploy/).

Base units (seconds, bytes), labels only from bounded sets (model names the worker loaded,
solver names, job statuses), never per request. In embedded mode they share the API's registry
and appear on its /metrics.
"""

from __future__ import annotations

import os
import time

import torch
from prometheus_client import Counter, Gauge, Histogram

from arcdiff.model.solvers import SOLVERS

BATCH_BUCKETS = tuple(float(2**i) for i in range(9))  # 1 .. 256
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ENCODE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

IMAGES = Counter("arcdiff_worker_images", "Images finished by the engine", ["model", "solver"])
NFE = Counter("arcdiff_worker_nfe", "Per-image network evaluations run by the engine", ["model", "solver"])
JOBS = Counter(
    "arcdiff_worker_jobs", "Generations ended by the engine (finished, failed, canceled, requeued)", ["model", "status"]
)
BATCH_SIZE = Histogram(
    "arcdiff_worker_batch_size", "Images in one network evaluation (before padding)", ["model"], buckets=BATCH_BUCKETS
)
QUEUE_WAIT = Histogram(
    "arcdiff_worker_queue_wait_seconds",
    "Seconds from acceptance to a generation's first image in the batch",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
SAMPLE = Histogram(
    "arcdiff_worker_sample_seconds",
    "Seconds a generation's images spent in the running batch",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
ENCODE = Histogram(
    "arcdiff_worker_encode_seconds", "Seconds to PNG-encode one image", ["model"], buckets=ENCODE_BUCKETS
)
RUNNING = Gauge("arcdiff_worker_running_images", "Images in the running batch", ["model"], multiprocess_mode="livesum")
WAITING = Gauge(
    "arcdiff_worker_waiting_images",
    "Images held by the engine, waiting for a batch slot",
    ["model"],
    multiprocess_mode="livesum",
)
PAUSED = Gauge(
    "arcdiff_worker_paused_images",
    "Batch-priority images in the batch that sat out the last network evaluation beside interactive ones",
    ["model"],
    multiprocess_mode="livesum",
)
LOAD = Gauge("arcdiff_worker_load_seconds", "Seconds to load the model", ["model"], multiprocess_mode="max")
COMPILE = Gauge(
    "arcdiff_worker_compile_seconds",
    "Seconds to compile and warm up the model (all buckets)",
    ["model"],
    multiprocess_mode="max",
)
DEVICE_MEMORY = Gauge(
    "arcdiff_worker_device_memory_bytes",
    "Device memory allocated by the engine",
    ["device"],
    multiprocess_mode="livesum",
)
UP = Gauge("arcdiff_worker_up", "1 while the worker serves its queues", multiprocess_mode="livesum")
BUSY = Gauge("arcdiff_worker_busy", "1 while the worker holds generations", multiprocess_mode="livesum")


def init_model_series(model: str) -> None:
    """Create a served model's counter and histogram series at zero, so rate() sees them rise from 0 (a series
    that first appears already at N shows no increase) and dashboards show 0 rather than nothing."""
    for solver in SOLVERS:
        IMAGES.labels(model, solver)
        NFE.labels(model, solver)
    for status in ("finished", "failed", "canceled"):
        JOBS.labels(model, status)
    for histogram in (BATCH_SIZE, QUEUE_WAIT, SAMPLE, ENCODE):
        histogram.labels(model)
    PAUSED.labels(model)
    COMPILE.labels(model)  # 0 until a warm-up sets it (stays 0 when the model is not compiled)


def sample_device_memory(device: torch.device) -> None:
    """Set the device memory gauge: CUDA's allocator on a GPU, the process's resident memory elsewhere."""
    if device.type == "cuda":
        used: int | None = torch.cuda.memory_allocated(device)
    else:
        try:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            used = None
    if used is not None:
        DEVICE_MEMORY.labels(str(device)).set(used)


class MemorySampler:
    """Sets the device memory gauge at most once per `every_s` (the engine calls it every tick)."""

    def __init__(self, device: torch.device, every_s: float = 1.0):
        self.device, self.every_s, self._next = device, every_s, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            sample_device_memory(self.device)
