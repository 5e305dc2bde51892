"""The API's settings: the HTTP front end's on top of the queue's (ApiSettings: all a Redis-mode
API reads), and `Settings`, what `arcdiff serve` reads: those plus the engine's, which only its
embedded mode uses (it runs the engine in-process). See arcdiff.settings for the split.

All come from ARCDIFF_* environment variables (an empty value counts as unset); `arcdiff serve`
flags override them. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from arcdiff.settings import QueueSettings, split_list
from arcdiff.worker.settings import EngineSettings

HASHED_KEY = re.compile(r"^sha256:[0-9a-fA-F]{64}$", re.IGNORECASE)
WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_SECRET_BYTES = (24, 64)  # what the Standard Webhooks spec asks of a secret


def webhook_secret_bytes(secret: str) -> bytes:
    """The key of a 'whsec_<base64>' secret; ValueError naming what is wrong."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError("a webhook secret is 'whsec_' followed by base64 (Standard Webhooks)")
    try:
        key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the webhook secret after 'whsec_' is not valid base64") from None
    low, high = WEBHOOK_SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"the webhook secret must decode to {low}..{high} bytes, got {len(key)}")
    return key


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
    idempotency_ttl_s: int = Field(
        86400, ge=1, description="seconds an Idempotency-Key is remembered (per API key) after its first request"
    )
    # webhooks (service/webhooks.py): signed with Standard Webhooks, sent by the API processes
    webhook_secret: SecretStr | None = Field(
        None,
        description="'whsec_<base64>' (24..64 bytes): the Standard Webhooks secret deliveries are signed with; "
        "unset: a request with a webhook is refused (422)",
    )
    webhook_attempts: int = Field(6, ge=1, le=20, description="attempts per webhook delivery before it fails")
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="seconds before the second attempt; each further wait doubles"
    )
    webhook_backoff_max_s: float = Field(600.0, gt=0, description="longest wait between two attempts")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="seconds one attempt may take")
    webhook_poll_s: float = Field(
        0.5, gt=0, le=60, description="how often the API looks for ended generations and due deliveries"
    )
    webhook_allow_private: bool = Field(
        False,
        description="allow webhooks to private, loopback, link-local and other non-global addresses (off: refused)",
    )
    webhook_allow_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated CIDRs (e.g. 10.1.2.0/24, 127.0.0.1/32) webhooks may reach although not global",
    )

    @field_validator("api_keys", "cors_origins", "webhook_allow_networks", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        return split_list(v)

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            webhook_secret_bytes(v.get_secret_value())
        return v

    @field_validator("webhook_allow_networks")
    @classmethod
    def _check_networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an address or CIDR network (e.g. 10.0.0.0/8)") from None
        return v

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
