"""Settings shared by the API and the workers, read from ARCDIFF_* environment variables.

An empty variable counts as unset. Command-line flags override these (the CLI passes them as
constructor arguments, which pydantic-settings ranks above the environment).

The settings are split by who needs them, and composed where one process plays several parts:

- `QueueSettings` (here): where generations go, which models they are for and how long they
  live: what the API and the workers agree on;
- `arcdiff.worker.settings.EngineSettings`: the engine's knobs (device, batch, precision,
  priorities); `WorkerSettings` adds the RQ worker loop's;
- `arcdiff.service.settings.ApiSettings`: the HTTP front end's; `Settings` (what `arcdiff serve`
  reads) adds the engine's, which only its embedded mode uses.

Nothing here imports torch: the API process reads these in Redis mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def split_list(value: object) -> object:
    """'a, b,c' -> ['a', 'b', 'c'] for list settings given as one environment string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class QueueSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARCDIFF_", env_ignore_empty=True, extra="ignore")

    # where jobs go and what is served
    redis_url: str | None = Field(None, description="Redis URL; unset: the API runs the engine in-process")
    model_dir: Path | None = Field(None, description="folder of model folders; unset: the bundled models")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="models to serve (comma-separated); empty: every model in model_dir"
    )
    log_level: str = Field("INFO", description="logging level")

    # a generation's lifecycle (RQ's job options, and the embedded API's memory)
    result_ttl_s: int = Field(3600, ge=1, description="seconds a finished generation is kept")
    failure_ttl_s: int = Field(86400, ge=1, description="seconds a failed generation is kept")
    job_timeout_s: int = Field(600, ge=1, description="a generation running longer than this fails")
    queue_timeout_s: float = Field(
        900.0, gt=0, description="a generation still waiting to start this many seconds after it was accepted fails"
    )
    retries: int = Field(1, ge=0, le=10, description="times a generation abandoned by a dead worker is run again")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: object) -> object:
        return split_list(v)
