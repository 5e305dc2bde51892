"""Where webhook state lives: in Redis (Redis mode, shared by every API process) or in memory
(embedded mode). Plain JSON, never pickle.

Per generation with a webhook: its config (`url`, `events`) and one delivery per event that
happened (`event`, `message_id`, `payload`, `state`, `attempts`, `next_attempt_at`). Two schedules
say what is due: generations to look at (until they end) and deliveries to attempt. Taking due
work *claims* it: its time moves to `until` in the same step (a Lua script in Redis), so two API
processes never take the same item, and an item whose taker died comes due again after that
lease. In Redis:

    arcdiff:webhook:<id>     hash: "config" -> JSON, "d:<event>" -> JSON of that delivery
    arcdiff:webhooks:watch   sorted set: generation id -> when to look at it next
    arcdiff:webhooks:due     sorted set: "<id>|<event>" -> when to attempt it next
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

import redis.asyncio as aredis
from redis.exceptions import RedisError

from arcdiff.service.backend import NotReady

HOOK_PREFIX = "arcdiff:webhook:"
WATCH_KEY = "arcdiff:webhooks:watch"
DUE_KEY = "arcdiff:webhooks:due"

# take up to ARGV[3] members scored at most ARGV[1], moving each to ARGV[2]: a claim with a lease
_CLAIM = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(items) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return items
"""

Delivery = dict[str, Any]


def due_member(gen_id: str, event: str) -> str:
    return f"{gen_id}|{event}"


def split_member(member: str) -> tuple[str, str]:
    gen_id, _, event = member.partition("|")
    return gen_id, event


class WebhookStore(Protocol):
    async def register(self, gen_id: str, config: dict[str, Any], first: Delivery | None, now: float) -> None:
        """Keep a generation's webhook, look at the generation from `now` on; `first` (the queued
        event's delivery) due at once."""

    async def config(self, gen_id: str) -> dict[str, Any] | None: ...

    async def load(self, gen_id: str) -> tuple[dict[str, Any], list[Delivery]] | None:
        """(config, deliveries), or None: no webhook (or forgotten)."""

    async def claim_watched(self, now: float, until: float, limit: int) -> list[str]:
        """Generations due to be looked at; not due again before `until`."""

    async def unwatch(self, gen_id: str) -> None: ...

    async def schedule(self, gen_id: str, delivery: Delivery, at: float) -> None:
        """Add a delivery due at `at`; nothing if this event's delivery exists already."""

    async def claim_due(self, now: float, until: float, limit: int) -> list[tuple[str, str]]:
        """(generation id, event) of the deliveries due; not due again before `until` (the lease)."""

    async def delivery(self, gen_id: str, event: str) -> Delivery | None: ...

    async def save(self, gen_id: str, delivery: Delivery, retry_at: float | None) -> None:
        """Store a delivery after an attempt; due again at `retry_at`, or never (None: done)."""


class RedisWebhookStore:
    def __init__(self, client: aredis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s  # how long a generation's webhook record is kept after its last change
        self._claim = client.register_script(_CLAIM)

    async def register(self, gen_id: str, config: dict[str, Any], first: Delivery | None, now: float) -> None:
        key = HOOK_PREFIX + gen_id
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "config", json.dumps(config))
            if first is not None:
                pipe.hset(key, "d:" + first["event"], json.dumps(first))
                pipe.zadd(DUE_KEY, {due_member(gen_id, first["event"]): now})
            pipe.expire(key, self.ttl_s)
            pipe.zadd(WATCH_KEY, {gen_id: now})
            await pipe.execute()

    async def config(self, gen_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(HOOK_PREFIX + gen_id, "config")
        return json.loads(raw) if raw else None

    async def load(self, gen_id: str) -> tuple[dict[str, Any], list[Delivery]] | None:
        try:
            fields: dict[Any, Any] = await self.redis.hgetall(HOOK_PREFIX + gen_id)  # bytes -> bytes
        except RedisError as e:  # a GET of the generation answers 503, as for the job itself
            raise NotReady(f"Redis error: {e}", retry_after=2) from None
        if b"config" not in fields:
            return None
        deliveries = [json.loads(v) for k, v in fields.items() if k.startswith(b"d:")]
        return json.loads(fields[b"config"]), sorted(deliveries, key=lambda d: d.get("created_at", 0))

    async def claim_watched(self, now: float, until: float, limit: int) -> list[str]:
        return [m.decode() for m in await self._claim(keys=[WATCH_KEY], args=[now, until, limit])]

    async def unwatch(self, gen_id: str) -> None:
        await self.redis.zrem(WATCH_KEY, gen_id)

    async def schedule(self, gen_id: str, delivery: Delivery, at: float) -> None:
        key = HOOK_PREFIX + gen_id
        if await self.redis.hsetnx(key, "d:" + delivery["event"], json.dumps(delivery)):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zadd(DUE_KEY, {due_member(gen_id, delivery["event"]): at}, nx=True)
                pipe.expire(key, self.ttl_s)
                await pipe.execute()

    async def claim_due(self, now: float, until: float, limit: int) -> list[tuple[str, str]]:
        return [split_member(m.decode()) for m in await self._claim(keys=[DUE_KEY], args=[now, until, limit])]

    async def delivery(self, gen_id: str, event: str) -> Delivery | None:
        raw = await self.redis.hget(HOOK_PREFIX + gen_id, "d:" + event)
        return json.loads(raw) if raw else None

    async def save(self, gen_id: str, delivery: Delivery, retry_at: float | None) -> None:
        key, member = HOOK_PREFIX + gen_id, due_member(gen_id, delivery["event"])
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "d:" + delivery["event"], json.dumps(delivery))
            pipe.expire(key, self.ttl_s)
            if retry_at is None:
                pipe.zrem(DUE_KEY, member)
            else:
                pipe.zadd(DUE_KEY, {member: retry_at})
            await pipe.execute()


class MemoryWebhookStore:
    """The same in this process's memory (embedded mode: one process, one event loop); records
    are forgotten `ttl_s` after their last change."""

    def __init__(self, ttl_s: int):
        self.ttl_s = ttl_s
        self._hooks: dict[str, tuple[dict[str, Any], dict[str, Delivery], float]] = {}
        self._watch: dict[str, float] = {}
        self._due: dict[tuple[str, str], float] = {}

    def _forget_old(self) -> None:
        now = time.time()
        for gen_id in [g for g, (_c, _d, changed) in self._hooks.items() if now - changed > self.ttl_s]:
            del self._hooks[gen_id]
            self._watch.pop(gen_id, None)
            for due in [d for d in self._due if d[0] == gen_id]:
                del self._due[due]

    async def register(self, gen_id: str, config: dict[str, Any], first: Delivery | None, now: float) -> None:
        self._forget_old()
        deliveries = {first["event"]: dict(first)} if first is not None else {}
        self._hooks[gen_id] = (dict(config), deliveries, time.time())
        if first is not None:
            self._due[(gen_id, first["event"])] = now
        self._watch[gen_id] = now

    async def config(self, gen_id: str) -> dict[str, Any] | None:
        hook = self._hooks.get(gen_id)
        return dict(hook[0]) if hook else None

    async def load(self, gen_id: str) -> tuple[dict[str, Any], list[Delivery]] | None:
        hook = self._hooks.get(gen_id)
        if hook is None:
            return None
        deliveries = sorted(hook[1].values(), key=lambda d: d.get("created_at", 0))
        return dict(hook[0]), [json.loads(json.dumps(d)) for d in deliveries]

    @staticmethod
    def _claim(schedule: dict[Any, float], now: float, until: float, limit: int) -> list[Any]:
        items = sorted((at, item) for item, at in schedule.items() if at <= now)[:limit]
        for _at, item in items:
            schedule[item] = until
        return [item for _at, item in items]

    async def claim_watched(self, now: float, until: float, limit: int) -> list[str]:
        return self._claim(self._watch, now, until, limit)

    async def unwatch(self, gen_id: str) -> None:
        self._watch.pop(gen_id, None)

    async def schedule(self, gen_id: str, delivery: Delivery, at: float) -> None:
        hook = self._hooks.get(gen_id)
        if hook is None or delivery["event"] in hook[1]:
            return
        hook[1][delivery["event"]] = dict(delivery)
        self._hooks[gen_id] = (hook[0], hook[1], time.time())
        self._due[(gen_id, delivery["event"])] = at

    async def claim_due(self, now: float, until: float, limit: int) -> list[tuple[str, str]]:
        return self._claim(self._due, now, until, limit)

    async def delivery(self, gen_id: str, event: str) -> Delivery | None:
        hook = self._hooks.get(gen_id)
        found = hook[1].get(event) if hook else None
        return json.loads(json.dumps(found)) if found is not None else None

    async def save(self, gen_id: str, delivery: Delivery, retry_at: float | None) -> None:
        hook = self._hooks.get(gen_id)
        if hook is None:
            return
        hook[1][delivery["event"]] = dict(delivery)
        self._hooks[gen_id] = (hook[0], hook[1], time.time())
        if retry_at is None:
            self._due.pop((gen_id, delivery["event"]), None)
        else:
            self._due[(gen_id, delivery["event"])] = retry_at
