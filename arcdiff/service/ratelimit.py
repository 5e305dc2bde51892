"""Per-caller limit on images per minute (ARCDIFF_RATE_LIMIT_IMAGES_PER_MIN).

A fixed one-minute window per caller (the API key's digest prefix, or the client address when no
keys are configured). In Redis mode the counter lives in Redis (`arcdiff:rate:<caller>:<minute>`),
so every API process behind a load balancer shares it; in embedded mode it lives in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time

import redis

from arcdiff.service.backend import NotReady

KEY_PREFIX = "arcdiff:rate:"


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def _window(now: float) -> tuple[int, int]:
    """(minute number, seconds until the next one, at least 1)."""
    minute = int(now // 60)
    return minute, max(1, math.ceil((minute + 1) * 60 - now))


class MemoryLimiter:
    def __init__(self, limit: int):
        self.limit = limit
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    async def take(self, caller: str, n: int) -> None:
        """Count n images for caller, or raise RateLimited (nothing counted)."""
        minute, retry = _window(time.time())
        with self._lock:
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= minute}
            used = self._counts.get((caller, minute), 0)
            if used + n > self.limit:
                raise RateLimited(_message(self.limit, used), retry)
            self._counts[(caller, minute)] = used + n

    async def give_back(self, caller: str, n: int) -> None:
        minute, _ = _window(time.time())
        with self._lock:
            if (caller, minute) in self._counts:
                self._counts[(caller, minute)] = max(0, self._counts[(caller, minute)] - n)


class RedisLimiter:
    """INCRBY the caller's counter for this minute; over the limit, take the images back and refuse."""

    def __init__(self, limit: int, client: redis.Redis):
        self.limit = limit
        self.redis = client

    def _take(self, caller: str, n: int) -> None:
        minute, retry = _window(time.time())
        key = f"{KEY_PREFIX}{caller}:{minute}"
        with self.redis.pipeline() as pipe:
            pipe.incrby(key, n)
            pipe.expire(key, 120)
            used, _ = pipe.execute()
        if used > self.limit:
            self.redis.decrby(key, n)
            raise RateLimited(_message(self.limit, used - n), retry)

    def _give_back(self, caller: str, n: int) -> None:
        minute, _ = _window(time.time())
        self.redis.decrby(f"{KEY_PREFIX}{caller}:{minute}", n)

    async def take(self, caller: str, n: int) -> None:
        try:
            await asyncio.to_thread(self._take, caller, n)
        except redis.RedisError as e:
            raise NotReady(f"Redis error: {e}", retry_after=2) from None

    async def give_back(self, caller: str, n: int) -> None:
        with contextlib.suppress(redis.RedisError):
            await asyncio.to_thread(self._give_back, caller, n)


def _message(limit: int, used: int) -> str:
    return f"rate limit: {limit} images per minute per API key ({used} used this minute)"
