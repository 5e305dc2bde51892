"""Idempotent submits: the `Idempotency-Key` header of POST /v1/generations.

The first request with a key claims it, atomically (Redis: SET NX; embedded: a lock in memory),
naming the generation id it is about to make and the fingerprint of its body, for at most
PENDING_TTL_S; once the generation is accepted the claim is marked made and kept for the TTL, and
if it is refused the claim is dropped. A later
request with the same key (within `ARCDIFF_IDEMPOTENCY_TTL_S`, per API key) finds the claim: with
the same body it gets that generation, with another body it is refused. Keys are scoped per API key
(without keys, one scope for everyone); only a SHA-256 of (scope, key) names the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aredis
from redis.exceptions import RedisError

from arcdiff.service.backend import NotReady

KEY_PREFIX = "arcdiff:idem:"
MAX_KEY_LENGTH = 255
KEY_PATTERN = r"^[!-~]+$"  # visible ASCII, no spaces
# a claim whose generation is not made yet lives this long at most: if the request that holds it dies
# before it submits (its API process killed), the key is free again after this, not after the TTL
PENDING_TTL_S = 60


def fingerprint(body: dict[str, Any]) -> str:
    """SHA-256 of the request as validated (every field, defaults filled), in canonical JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_name(scope: str, key: str) -> str:
    return hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """Who holds a key: the body's fingerprint, the generation id, and whether it was accepted."""

    fingerprint: str
    gen_id: str
    made: bool = False

    def to_json(self) -> str:
        return json.dumps({"fingerprint": self.fingerprint, "id": self.gen_id, "made": self.made})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Claim:
        data = json.loads(raw)
        return cls(str(data["fingerprint"]), str(data["id"]), bool(data.get("made", False)))


class IdempotencyStore(Protocol):
    async def claim(self, scope: str, key: str, mine: Claim) -> Claim | None:
        """Take the key for `mine` (None: taken now), or the claim that holds it."""

    async def made(self, scope: str, key: str, mine: Claim) -> None:
        """Mark `mine` accepted (its generation exists)."""

    async def release(self, scope: str, key: str, mine: Claim) -> None:
        """Drop `mine` (its generation was refused), if it still holds the key."""


class RedisIdempotency:
    _RELEASE = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
    return 0
    """

    def __init__(self, client: aredis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s
        self._release = client.register_script(self._RELEASE)

    async def claim(self, scope: str, key: str, mine: Claim) -> Claim | None:
        name = KEY_PREFIX + record_name(scope, key)
        try:
            for _ in range(3):  # a claim that expires between SET and GET: try again
                if await self.redis.set(name, mine.to_json(), nx=True, ex=min(PENDING_TTL_S, self.ttl_s)):
                    return None
                raw = await self.redis.get(name)
                if raw is not None:
                    return Claim.from_json(raw)
        except RedisError as e:
            raise NotReady(f"Redis error: {e}", retry_after=2) from None
        raise NotReady("the idempotency record keeps changing", retry_after=1)

    async def made(self, scope: str, key: str, mine: Claim) -> None:
        name = KEY_PREFIX + record_name(scope, key)
        done = Claim(mine.fingerprint, mine.gen_id, made=True)
        with contextlib.suppress(RedisError):  # then the claim stays "not made": a repeat still finds the generation
            await self.redis.set(name, done.to_json(), xx=True, ex=self.ttl_s)

    async def release(self, scope: str, key: str, mine: Claim) -> None:
        with contextlib.suppress(RedisError):  # then it lapses with its TTL
            await self._release(keys=[KEY_PREFIX + record_name(scope, key)], args=[mine.to_json()])


class MemoryIdempotency:
    """The same in memory (embedded mode), under a lock; claims expire after `ttl_s`."""

    def __init__(self, ttl_s: int):
        self.ttl_s = ttl_s
        self._claims: dict[str, tuple[Claim, float]] = {}
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        self._claims = {k: v for k, v in self._claims.items() if v[1] > now}

    async def claim(self, scope: str, key: str, mine: Claim) -> Claim | None:
        name, now = record_name(scope, key), time.monotonic()
        with self._lock:
            self._expire(now)
            held = self._claims.get(name)
            if held is not None:
                return held[0]
            self._claims[name] = (mine, now + min(PENDING_TTL_S, self.ttl_s))
            return None

    async def made(self, scope: str, key: str, mine: Claim) -> None:
        name = record_name(scope, key)
        with self._lock:
            held = self._claims.get(name)
            if held is not None and held[0] == mine:
                self._claims[name] = (Claim(mine.fingerprint, mine.gen_id, made=True), time.monotonic() + self.ttl_s)

    async def release(self, scope: str, key: str, mine: Claim) -> None:
        name = record_name(scope, key)
        with self._lock:
            held = self._claims.get(name)
            if held is not None and held[0] == mine:
                del self._claims[name]


async def settle(
    store: IdempotencyStore,
    scope: str,
    key: str,
    mine: Claim,
    exists: Any,
    timeout: float = 10.0,
    interval: float = 0.05,
) -> Claim | None:
    """Claim `key` for `mine`: None when this request holds it (go on and make the generation);
    else the claim of the generation made for it, once that generation exists (`exists(gen_id)`
    says so). A claim whose first request is still submitting is waited for (at most `timeout`),
    and one dropped meanwhile (that request was refused) is taken over. Raises InProgress or
    Expired."""
    deadline = time.monotonic() + timeout
    while True:
        held = await store.claim(scope, key, mine)
        if held is None:
            return None
        if held.fingerprint != mine.fingerprint:
            return held  # the caller refuses it
        if await exists(held.gen_id):
            return held
        if held.made:
            raise Expired(held.gen_id)
        if time.monotonic() > deadline:
            raise InProgress(held.gen_id)
        await asyncio.sleep(interval)


class InProgress(Exception):
    """The first request with this key is still being submitted."""


class Expired(Exception):
    """The generation made for this key is gone (its results expired)."""
