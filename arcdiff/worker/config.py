"""The engine's settings, as plain values (the worker fills them from WorkerSettings, tests and
benchmarks directly); the scheduling ones go on to the scheduler as a SchedulerConfig."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arcdiff.worker.scheduler import SchedulerConfig


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings (plain values; the models and threads it runs are passed beside it).

    `buckets`: the padded batch sizes (default 1, 2, 4, ..., max_batch); the largest must be
    max_batch. Batches are padded to them only with `warm_up` (a compiled network, which wants
    few shapes); otherwise the network runs the exact batch. A benchmark that always runs full
    batches warms up just (max_batch,).
    `warm_up`: before serving, call every model's forward once per bucket on the device thread
    (compiles there; CUDA graphs are recorded per thread), see loading.warm_up.
    `recompile_stance`: torch.compiler stance set after the warm-up ("eager_on_recompile" in the
    worker: an unexpected new shape runs eagerly instead of stalling the batch for a compile;
    tests use "fail_on_recompile").
    The scheduling settings (tick_budget and below) are explained in scheduler.SchedulerConfig."""

    device: str | torch.device = "cpu"
    max_batch: int = 32
    buckets: tuple[int, ...] | None = None
    encode_threads: int = 2
    worker: str = ""  # the name shown in each result's metrics
    job_timeout_s: float | None = None  # a generation not done this long after submission fails
    # a generation still waiting this long after it was accepted (spec.submitted_at, so time
    # spent in Redis counts) fails instead of starting
    queue_timeout_s: float | None = None
    keep_samples: bool = False  # also return the float samples (tests, local tools)
    warm_up: bool = False
    recompile_stance: str | None = None
    progress_interval_s: float = 0.25  # at most one progress event per generation this often
    preview_interval_s: float = 0.5  # at most one round of previews per generation this often
    tick_budget: float = 1.2
    tick_budget_min_s: float = 0.001
    batch_min_share: float = 0.05
    max_images_per_key: int = 0

    def __post_init__(self) -> None:
        _ = self.scheduling  # builds, and so checks, the scheduler's settings

    @property
    def scheduling(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_batch=self.max_batch,
            buckets=tuple(self.buckets or ()),
            pad=self.warm_up,
            tick_budget=self.tick_budget,
            tick_budget_min_s=self.tick_budget_min_s,
            batch_min_share=self.batch_min_share,
            max_images_per_key=self.max_images_per_key,
        )

    @property
    def bucket_sizes(self) -> list[int]:
        return self.scheduling.bucket_sizes
