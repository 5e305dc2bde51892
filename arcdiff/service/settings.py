"""The API's settings: the HTTP front end's on top of the queue's (ApiSettings: all a Redis-mode
API reads), and `Settings`, what `arcdiff serve` reads: those plus the engine's, which only its
embedded mode uses (it runs the engine in-process). See arcdiff.settings for the split.

All come from ARCDIFF_* environment variables (an empty value counts as unset); `arcdiff serve`
flags override them. Nothing here imports torch.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from arcdiff.settings import QueueSettings, split_list
from arcdiff.worker.settings import EngineSettings

HASHED_KEY = re.compile(r"^sha256:[0-9a-fA-F]{64}$", re.IGNORECASE)


class ApiSettings(QueueSettings):
    """The HTTP front end: what the API reads in either mode."""

    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the API listens on")
    api_workers: int = Field(1, ge=1, le=64, description="uvicorn processes of the API (more than 1 needs a Redis URL)")
    max_images: int = Field(16, ge=1, le=256, description="largest n a request may ask for")
    queue_limit: int = Field(256, ge=1, description="generations waiting per model before 429")
    wait_timeout_s: float = Field(60.0, gt=0, description="longest a wait=true request is held before 202")
    ready_cache_s: float = Field(2.0, ge=0, description="seconds a readiness check (Redis, workers) is reused")
    ready_requires_workers: bool = Field(
        False,
        description="with Redis: /readyz is 503 and generations are refused (503) while a served model has no live "
        "worker, so the API leaves the load balancer's rotation. Off (default): the API is ready when Redis answers "
        "and generations wait in the queue until a worker starts (workers can scale to zero)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys, each plain or 'sha256:<64 hex>' (the SHA-256 of the key); if set, "
        "every route but /healthz and /readyz needs 'Authorization: Bearer KEY'",
    )
    rate_limit_images_per_min: int = Field(
        0,
        ge=0,
        description="images per minute one API key (or, without keys, one client address) may ask for; 0: no limit",
    )
    max_body_bytes: int = Field(65536, ge=1024, description="largest request body; larger: 413")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS ('*' for any); empty: CORS off"
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        return split_list(v)

    @field_validator("api_keys")
    @classmethod
    def _check_hashes(cls, v: list[str]) -> list[str]:
        for key in v:
            if key.lower().startswith("sha256:") and not HASHED_KEY.match(key):
                raise ValueError("a hashed key must be 'sha256:' and 64 hex digits (the SHA-256 of the key)")
        return v

    @property
    def embedded(self) -> bool:
        return not self.redis_url


class Settings(ApiSettings, EngineSettings):
    """`arcdiff serve`: the API's settings and the engine's; embedded mode (no Redis URL) runs the
    engine in this process with them, Redis mode reads only ApiSettings' fields."""
