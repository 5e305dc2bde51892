"""Settings of the engine and the RQ worker, read from ARCDIFF_* environment variables (see
arcdiff.settings for how the settings are split, and docs/configuration.md for each one).

`EngineSettings` is what an engine needs, in a worker or in the embedded API; `WorkerSettings`
adds the RQ worker loop's. Both extend the queue's settings (models, job lifecycle). No torch.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import Field, field_validator

from arcdiff.settings import QueueSettings, split_list  # noqa: F401  (split_list: re-exported)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


Amp = Literal["auto", "none", "bf16", "fp16"]
CompileMode = Literal["auto", "none", "default", "reduce-overhead", "max-autotune"]
AMP_CHOICES: tuple[str, ...] = get_args(Amp)  # the CLI's --amp and --compile choices
COMPILE_CHOICES: tuple[str, ...] = get_args(CompileMode)


class EngineSettings(QueueSettings):
    """What an engine reads: the device and batch, precision and compilation, and the scheduling
    policy (priorities, the per-key cap)."""

    # the engine
    device: str = Field("auto", description="auto, cpu, mps, cuda or cuda:N")
    max_batch: int = Field(32, ge=1, le=1024, description="images in one network evaluation")
    encode_threads: int = Field(2, ge=1, le=64, description="threads that PNG-encode finished images")
    amp: Amp = Field(
        "auto",
        description="autocast dtype for the network (solver state stays float32); auto: bf16 on CUDA "
        "(fp16 without bf16 support) and on CPUs with native bf16 (AVX512-BF16 or AMX), none elsewhere",
    )
    compile: CompileMode = Field(
        "auto",
        description="torch.compile mode, compiled per batch bucket at start-up; reduce-overhead adds "
        "CUDA graphs; auto: reduce-overhead on CUDA, none elsewhere",
    )
    channels_last: bool | None = Field(
        None, description="run the network in channels-last memory format; unset: on for CUDA, off elsewhere"
    )
    # One intra-op thread on a CPU by default: a CPU is usually shared (the API, PNG encoding, other
    # processes), and torch's default of one OpenMP thread per core collapses when the cores are busy
    # (figures: docs/performance.md#cpu-threads). Give a CPU host the service has to itself more threads.
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch.set_num_threads for the engine process; unset: 1 on a CPU, torch's default (one per "
        "core) on CUDA and MPS",
    )
    # priorities (the request's "priority") and the per-client cap
    tick_budget: float = Field(
        1.2,
        ge=1.0,
        description="while interactive images run, a network evaluation may take this many times as long as the "
        "interactive images alone would (predicted from the forward times measured per batch size); batch-priority "
        "images fill that time and the rest of them pause",
    )
    tick_budget_min_ms: float = Field(
        1.0,
        ge=0.0,
        description="the same budget is at least this many milliseconds above the interactive images' own time "
        "(small batches on a GPU, whose timings jitter, are then not paused for noise)",
    )
    batch_min_share: float = Field(
        0.05,
        ge=0.0,
        description="paused batch images still get at least this much forward time, as a fraction of the "
        "interactive images' own; 0: none (a constant interactive stream then starves them)",
    )
    max_images_per_key: int = Field(
        0,
        ge=0,
        description="images of one API key (or, without keys, one client address) in the batch at once; "
        "the key's further images wait while others go first; 0: no cap",
    )

    def engine_threads(self, device_type: str) -> int | None:
        """The intra-op threads for an engine on `device_type` (None: leave torch's default)."""
        if self.torch_threads:
            return self.torch_threads
        return 1 if device_type == "cpu" else None

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not DEVICE_PATTERN.match(v):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {v!r}")
        return v


class WorkerSettings(EngineSettings):
    """`arcdiff worker`: an engine serving RQ queues, and the worker loop around it."""

    heartbeat_s: float = Field(10.0, gt=0, description="seconds between heartbeats of the jobs a worker holds")
    maintenance_s: int = Field(30, ge=1, description="seconds between a worker's RQ registry clean-ups")
    worker_ttl_s: int = Field(60, ge=5, description="a worker missing heartbeats this long is considered dead")
    drain_timeout_s: float = Field(
        25.0, ge=0, description="on SIGTERM, seconds to finish running jobs before requeueing"
    )
    worker_name: str | None = Field(None, description="RQ worker name; unset: host.pid.random")
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="worker's Prometheus port; 0: none")
