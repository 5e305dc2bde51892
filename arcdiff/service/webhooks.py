"""Webhooks: a generation's events POSTed to the URL its request named, signed with Standard
Webhooks (https://www.standardwebhooks.com: HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>"
with the server's secret, sent as `webhook-signature: v1,<base64>`), retried with exponential backoff.

Deliveries run in the API processes, in both modes: every way a generation ends is seen there (a
worker finishing or failing it, a cancel that takes it off the queue, a queue expiry or a dead
worker found by status), the secret and the outgoing-host policy are the API's settings, and
workers need no way out of their network. Each API process runs one loop (`WebhookDispatcher`):
every `ARCDIFF_WEBHOOK_POLL_S` it claims the generations due to be looked at (a delivery is made for
each asked-for event once the generation has it) and the deliveries due, and attempts them. The
state is in a `WebhookStore` (Redis in Redis mode), claimed with leases, so any replica delivers
and a replica that restarts loses nothing: what it held comes due again.

A delivery's body is fixed when it is made and the same on every attempt (as its webhook-id is);
each attempt is signed afresh with its own timestamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import httpx
from standardwebhooks import Webhook

from arcdiff.service.backend import Generation, Rejected
from arcdiff.service.settings import ApiSettings
from arcdiff.service.webhook_store import Delivery, WebhookStore
from arcdiff.service.webhook_targets import TargetPolicy, TargetRefused, Unresolvable

log = logging.getLogger("arcdiff.webhooks")

USER_AGENT = "arcdiff-webhooks/0.1"
MAX_IN_FLIGHT = 32  # attempts one API process runs at once
WATCH_BATCH = 128  # generations looked at per round
LEASE_MARGIN_S = 30.0  # a claimed attempt comes due again this long after its timeout (its taker died)


def iso(t: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds ('...Z')."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_id(gen_id: str, event: str) -> str:
    """The webhook-id of a generation's event: stable, so a receiver can drop a repeated delivery."""
    return f"msg_{gen_id}_{event}"


class WebhookDispatcher:
    """Registers webhooks, follows their generations, and delivers (one per API process)."""

    def __init__(
        self,
        settings: ApiSettings,
        store: WebhookStore,
        get: Callable[[str], Awaitable[Generation | None]],
        render: Callable[[Generation], dict[str, Any]],
    ):
        if settings.webhook_secret is None:
            raise ValueError("webhooks need ARCDIFF_WEBHOOK_SECRET")
        self.settings = settings
        self.store = store
        self.get = get  # the backend's: the generation as it is now
        self.render = render  # a generation as a delivery's `data`
        self.policy = TargetPolicy(settings.webhook_allow_private, settings.webhook_allow_networks)
        self.signer = Webhook(settings.webhook_secret.get_secret_value())
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task] = set()

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        # no proxies from the environment (the address checks must hold for the connection itself),
        # no redirects (a 3xx could point anywhere): a 3xx is a failed attempt
        self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.settings.webhook_timeout_s)
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def close(self) -> None:
        """Stop; attempts in flight are dropped unrecorded and come due again after their lease."""
        for task in [self._task, *self._in_flight]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._task, *self._in_flight] if t is not None], return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    # ---- what the routes call --------------------------------------------------------------------

    async def check_target(self, url: str) -> None:
        """At submit time: TargetRefused (bad form or a refused address) or Unresolvable."""
        await self.policy.resolve(url)

    async def register(self, gen: Generation, url: str, events: list[str]) -> None:
        """Follow an accepted generation for its webhook (its `queued` delivery made now if asked for)."""
        now = time.time()
        config = {"url": url, "events": list(events), "created_at": now}
        first = self._make_delivery(gen, "queued", now) if "queued" in events else None
        await self.store.register(gen.spec.id, config, first, now)
        self._wake.set()

    async def describe(self, gen_id: str) -> dict[str, Any] | None:
        """The generation's `webhook` object (GenerationOut.webhook), or None without one."""
        loaded = await self.store.load(gen_id)
        if loaded is None:
            return None
        config, deliveries = loaded
        return {
            "url": config["url"],
            "events": config["events"],
            "deliveries": [
                {
                    "event": d["event"],
                    "message_id": d["message_id"],
                    "state": d["state"],
                    "attempts": d["attempts"],
                    "next_attempt_at": iso(d["next_attempt_at"]) if d.get("next_attempt_at") else None,
                }
                for d in deliveries
            ],
        }

    # ---- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away, say: the next round tries again
                log.warning("webhook round failed: %s: %s", type(e).__name__, e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.webhook_poll_s)
            self._wake.clear()

    async def _round(self) -> None:
        now = time.time()
        for gen_id in await self.store.claim_watched(now, now + self.settings.webhook_poll_s, WATCH_BATCH):
            await self._look(gen_id)
        free = MAX_IN_FLIGHT - len(self._in_flight)
        if free <= 0:
            return
        lease = now + self.settings.webhook_timeout_s + LEASE_MARGIN_S
        for gen_id, event in await self.store.claim_due(now, lease, free):
            task = asyncio.create_task(self._attempt(gen_id, event))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _look(self, gen_id: str) -> None:
        """Make the delivery of a generation that has ended (if its event was asked for)."""
        config = await self.store.config(gen_id)
        if config is None:  # forgotten
            await self.store.unwatch(gen_id)
            return
        try:
            gen = await self.get(gen_id)
        except Rejected:
            return  # the queue is unreachable: look again next time
        if gen is None:  # expired before it was looked at
            await self.store.unwatch(gen_id)
            return
        if not gen.done:
            return
        if gen.status in config["events"]:
            await self.store.schedule(gen_id, self._make_delivery(gen, gen.status, time.time()), time.time())
            self._wake.set()
        await self.store.unwatch(gen_id)

    def _make_delivery(self, gen: Generation, event: str, now: float) -> Delivery:
        payload = {"type": f"generation.{event}", "timestamp": iso(now), "data": self.render(gen)}
        return {
            "event": event,
            "message_id": message_id(gen.spec.id, event),
            "payload": json.dumps(payload, separators=(",", ":")),
            "state": "pending",
            "attempts": [],
            "next_attempt_at": now,
            "created_at": now,
        }

    async def _attempt(self, gen_id: str, event: str) -> None:
        try:
            delivery = await self.store.delivery(gen_id, event)
            config = await self.store.config(gen_id)
            if delivery is None or config is None or delivery["state"] != "pending":
                if delivery is not None:
                    await self.store.save(gen_id, delivery, None)
                return
            attempt, outcome = await self._send(config["url"], delivery["message_id"], delivery["payload"].encode())
            delivery["attempts"].append(attempt)
            retry_at = None
            if outcome == "delivered":
                delivery["state"] = "delivered"
            elif outcome == "refused" or len(delivery["attempts"]) >= self.settings.webhook_attempts:
                delivery["state"] = "failed"
            else:
                retry_at = time.time() + self.backoff(len(delivery["attempts"]))
            delivery["next_attempt_at"] = retry_at
            await self.store.save(gen_id, delivery, retry_at)
            if delivery["state"] != "pending":
                log.info(
                    "webhook %s for %s: %s after %d attempt(s)",
                    event,
                    gen_id,
                    delivery["state"],
                    len(delivery["attempts"]),
                )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the store failed: the lease brings it back
            log.warning("webhook %s for %s: %s: %s", event, gen_id, type(e).__name__, e)

    def backoff(self, attempts_made: int) -> float:
        """Seconds before the next attempt after `attempts_made` (1, 2, ...): doubling, capped."""
        s = self.settings
        return min(s.webhook_backoff_max_s, s.webhook_backoff_s * 2 ** (attempts_made - 1))

    async def _send(self, url: str, msg_id: str, body: bytes) -> tuple[dict[str, Any], str]:
        """One attempt: (its record, 'delivered' | 'retry' | 'refused')."""
        started, t0 = time.time(), time.monotonic()
        status_code: int | None = None
        error: str | None = None
        try:
            status_code = await asyncio.wait_for(self._post(url, msg_id, body), self.settings.webhook_timeout_s)
            outcome = "delivered" if 200 <= status_code < 300 else "retry"
        except TargetRefused as e:
            error, outcome = f"refused: {e}", "refused"
        except Unresolvable as e:
            error, outcome = str(e), "retry"
        except (httpx.HTTPError, OSError, asyncio.TimeoutError) as e:
            error, outcome = (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__), "retry"
        attempt = {
            "at": iso(started),
            "status_code": status_code,
            "error": error,
            "duration_ms": round((time.monotonic() - t0) * 1000, 3),
        }
        return attempt, outcome

    async def _post(self, url: str, msg_id: str, body: bytes) -> int:
        """Resolve and check the host again (the name may point elsewhere now), sign, POST to the
        checked address; the receiver's status (its body is not read)."""
        if self._http is None:
            raise RuntimeError("the dispatcher is not started")
        target = await self.policy.resolve(url)
        ts = datetime.now(timezone.utc)
        headers = {
            **target.headers,
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(math.floor(ts.timestamp())),
            "webhook-signature": self.signer.sign(msg_id, ts, body),
        }
        async with self._http.stream(
            "POST", target.url, content=body, headers=headers, extensions=target.extensions
        ) as r:
            return r.status_code
