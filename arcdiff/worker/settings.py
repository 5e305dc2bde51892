"""Settings of the engine and the RQ worker, read from ARCDIFF_* environment variables.

An empty variable counts as unset. Command-line flags override these (the CLI passes them as
constructor arguments, which pydantic-settings ranks above the environment).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def split_list(value: object) -> object:
    """'a, b,c' -> ['a', 'b', 'c'] for list settings given as one environment string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARCDIFF_", env_ignore_empty=True, extra="ignore")

    # where jobs come from and what to serve
    redis_url: str | None = Field(None, description="Redis URL; unset: the API runs the engine in-process")
    model_dir: Path | None = Field(None, description="folder of model folders; unset: the bundled models")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="models to serve (comma-separated); empty: every model in model_dir"
    )

    # the engine
    device: str = Field("auto", description="auto, cpu, mps, cuda or cuda:N")
    max_batch: int = Field(32, ge=1, le=1024, description="images in one network evaluation")
    encode_threads: int = Field(2, ge=1, le=64, description="threads that PNG-encode finished images")
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto",
        description="autocast dtype for the network (solver state stays float32); auto: bf16 on CUDA "
        "(fp16 without bf16 support), none elsewhere",
    )
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune"] = Field(
        "auto",
        description="torch.compile mode, compiled per batch bucket at start-up; reduce-overhead adds "
        "CUDA graphs; auto: reduce-overhead on CUDA, none elsewhere",
    )
    channels_last: bool | None = Field(
        None, description="run the network in channels-last memory format; unset: on for CUDA, off elsewhere"
    )
    # One intra-op thread on a CPU by default: a CPU is usually shared (the API, PNG encoding, other
    # processes), and torch's default of one OpenMP thread per core collapses when the cores are busy:
    # on a 2-core machine under load, embedded mnist served 5.7 images/s with 1 thread and 0.09 with
    # 2 (docs/performance.md#cpu-threads). Give a CPU host the service has to itself more threads.
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

    # RQ job lifecycle
    result_ttl_s: int = Field(3600, ge=1, description="seconds a finished generation is kept")
    failure_ttl_s: int = Field(86400, ge=1, description="seconds a failed generation is kept")
    job_timeout_s: int = Field(600, ge=1, description="a generation running longer than this fails")
    queue_timeout_s: float = Field(
        900.0, gt=0, description="a generation still waiting to start this many seconds after it was accepted fails"
    )
    retries: int = Field(1, ge=0, le=10, description="times a generation abandoned by a dead worker is run again")
    heartbeat_s: float = Field(10.0, gt=0, description="seconds between heartbeats of the jobs a worker holds")
    maintenance_s: int = Field(30, ge=1, description="seconds between a worker's RQ registry clean-ups")
    worker_ttl_s: int = Field(60, ge=5, description="a worker missing heartbeats this long is considered dead")
    drain_timeout_s: float = Field(
        25.0, ge=0, description="on SIGTERM, seconds to finish running jobs before requeueing"
    )
    worker_name: str | None = Field(None, description="RQ worker name; unset: host.pid.random")
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="worker's Prometheus port; 0: none")
    log_level: str = Field("INFO", description="logging level")

    def engine_threads(self, device_type: str) -> int | None:
        """The intra-op threads for an engine on `device_type` (None: leave torch's default)."""
        if self.torch_threads:
            return self.torch_threads
        return 1 if device_type == "cpu" else None

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: object) -> object:
        return split_list(v)

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not DEVICE_PATTERN.match(v):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {v!r}")
        return v
