"""The API's settings: the worker's (embedded mode runs the same engine) plus the HTTP front end's.

All come from ARCDIFF_* environment variables (an empty value counts as unset); `arcdiff serve`
flags override them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from worker.settings import WorkerSettings, split_list


class Settings(WorkerSettings):
    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the API listens on")
    max_images: int = Field(16, ge=1, le=256, description="largest n a request may ask for")
    queue_limit: int = Field(256, ge=1, description="generations waiting per model before 429")
    wait_timeout_s: float = Field(60.0, gt=0, description="longest a wait=true request is held before 202")
    ready_cache_s: float = Field(2.0, ge=0, description="seconds a readiness check (Redis, workers) is reused")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated keys; if set, /v1 needs 'Authorization: Bearer KEY'"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        return split_list(v)

    @property
    def embedded(self) -> bool:
        return not self.redis_url
