"""Client and AsyncClient drive one core (arcdiff.client's operation generators): the same scripted
server answers, run through each, must give the same requests, results and errors. A mock transport,
no server; event streams that break mid-way are resumed with Last-Event-ID."""

import asyncio
import json
import time

import httpx
import pytest

from arcdiff.client import APIError, AsyncClient, Client, GenerationEvent, Unreachable

pytestmark = pytest.mark.timeout(60)

ID = "b" * 32
BODY = {
    "id": ID,
    "status": "finished",
    "url": f"/v1/generations/{ID}",
    "model": "m",
    "steps": 1,
    "solver": "euler",
    "seed": 3,
    "n": 1,
    "nfe": 1,
    "images": [{"index": 0, "seed": 3, "png_base64": "iVBORw0KGgo="}],
    "metrics": {"total_ms": 1.0},
}
OPTS = {"api_key": "k", "max_retries": 2, "max_retry_wait": 0.05, "poll_interval": 0.01}


class BrokenStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Some SSE bytes, then (if `broken`) the connection drops."""

    def __init__(self, data: bytes, broken: bool):
        self.data, self.broken = data, broken

    def __iter__(self):
        yield self.data
        if self.broken:
            raise httpx.ReadError("connection reset")

    async def __aiter__(self):
        yield self.data
        if self.broken:
            raise httpx.ReadError("connection reset")


def sse(events: list[tuple[str, str, dict]]) -> bytes:
    return b"".join(f"id: {i}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode() for i, name, data in events)


def scripted(answers: list, seen: list) -> httpx.MockTransport:
    """answers: (status, headers, json body), ("sse", events, broken) or an exception to raise."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body, request.headers.get("last-event-id")))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer[0] == "sse":
            stream = BrokenStream(sse(answer[1]), answer[2])
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)
        code, headers, json_body = answer
        return httpx.Response(code, headers=headers, json=json_body)

    return httpx.MockTransport(handler)


def outcome(value):
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value), getattr(value, "status_code", None))
    if isinstance(value, list) and value and isinstance(value[0], GenerationEvent):
        return [(ev.event, ev.data, ev.id) for ev in value]
    if hasattr(value, "images"):
        return (value.id, value.retries, value.seeds, [im.png for im in value.images], value.metrics)
    return value


def run_sync(answers, calls, **opts):
    seen, out = [], []
    with Client("http://svc", transport=scripted(answers, seen), **opts) as client:
        for name, args, kw in calls:
            try:
                value = getattr(client, name)(*args, **kw)
                out.append(outcome(list(value) if name == "events" else value))
            except Exception as e:
                out.append(outcome(e))
    return out, seen


def run_async(answers, calls, **opts):
    async def main():
        seen, out = [], []
        async with AsyncClient("http://svc", transport=scripted(answers, seen), **opts) as client:
            for name, args, kw in calls:
                try:
                    if name == "events":
                        value = [ev async for ev in client.events(*args, **kw)]
                    else:
                        value = await getattr(client, name)(*args, **kw)
                    out.append(outcome(value))
                except Exception as e:
                    out.append(outcome(e))
        return out, seen

    return asyncio.run(main())


RETRY = (503, {"Retry-After": "0.01"}, {"detail": "loading models"})
SCENARIOS = {
    "generate: retried, then polled to its end": (
        [
            RETRY,
            (429, {"Retry-After": "3600"}, {"detail": "queue full"}),
            (202, {}, {**BODY, "status": "queued"}),
            (200, {}, {**BODY, "status": "running"}),
            (200, {}, BODY),
        ],
        [("generate", ("m", 1, "euler"), {"seed": 3, "timeout": 10})],
    ),
    "generate: out of retries, then a failure, then a transport error": (
        [RETRY] * 3
        + [(202, {}, {**BODY, "status": "queued"}), (200, {}, {**BODY, "status": "failed", "error": "NaN"})]
        + [httpx.ConnectError("refused")],
        [("generate", ("m",), {"n": 2, "priority": "batch"})] * 3,
    ),
    "submit, get, models, cancel and their errors": (
        [
            (202, {}, {**BODY, "status": "queued"}),
            RETRY,
            (200, {}, BODY),
            (200, {}, [{"name": "m"}]),
            (409, {}, {"detail": "already finished"}),
            (422, {}, {"detail": [{"loc": ["body", "steps"], "msg": "too big"}]}),
        ],
        [
            ("submit", ("m", 4, "rk4"), {"schedule": "cosine", "preview": True}),
            ("get", (ID,), {}),
            ("models", (), {}),
            ("cancel", (ID,), {}),
            ("submit", ("m", 10**6), {}),
        ],
    ),
    "events: resumed after a drop, then a 404": (
        [
            ("sse", [("1-0", "queued", {}), ("2-0", "progress", {"nfe_done": 1, "nfe_total": 2})], True),
            ("sse", [("3-0", "progress", {"nfe_done": 2, "nfe_total": 2}), ("4-0", "finished", BODY)], False),
            (404, {}, {"detail": "no such generation"}),
        ],
        [("events", (ID,), {}), ("events", ("c" * 32,), {})],
    ),
    "events: the server closes the stream before the end": (
        [("sse", [("1-0", "queued", {})], False)],
        [("events", (ID,), {})],
    ),
}


def scenario(name):
    answers, calls = SCENARIOS[name]
    return list(answers), calls


@pytest.mark.parametrize("name", SCENARIOS)
def test_sync_and_async_clients_agree(name):
    answers, calls = SCENARIOS[name]
    sync_out, sync_seen = run_sync(list(answers), calls, **OPTS)
    async_out, async_seen = run_async(list(answers), calls, **OPTS)
    assert sync_out == async_out
    assert sync_seen == async_seen
    assert len(sync_seen) == len(answers)  # every scripted answer was asked for, by both


def test_parity_outcomes():
    """What the scenarios above agree on is the documented behaviour, not a shared mistake."""
    out, seen = run_sync(*scenario("generate: retried, then polled to its end"), **OPTS)
    assert out[0][:3] == (ID, 2, [3])
    assert [s[0] for s in seen] == ["POST"] * 3 + ["GET"] * 2 and seen[0][2]["wait"] is True

    out, _ = run_sync(*scenario("generate: out of retries, then a failure, then a transport error"), **OPTS)
    assert out[0] == ("APIError", "503: loading models", 503)
    assert out[1] == ("GenerationFailed", f"generation {ID} failed: NaN", None)
    assert out[2][0] == "Unreachable" and out[2][1].startswith("cannot reach http://svc: ConnectError")

    out, seen = run_sync(*scenario("events: resumed after a drop, then a 404"), **OPTS)
    assert [ev[0] for ev in out[0]] == ["queued", "progress", "progress", "finished"]
    assert [s[3] for s in seen] == [None, "2-0", None]  # resumed from the last event seen
    assert out[1] == ("APIError", "404: no such generation", 404)


def test_generate_on_event_follows_the_stream():
    events = [("1-0", "queued", {}), ("2-0", "finished", BODY)]
    seen, got = [], []
    answers = [(202, {}, {**BODY, "status": "queued"}), ("sse", events, False)]
    with Client("http://svc", transport=scripted(answers, seen), **OPTS) as client:
        result = client.generate("m", 1, on_event=got.append, preview=True)
    assert result.id == ID and [ev.event for ev in got] == ["queued", "finished"] and not answers
    assert seen[0][2] == {"model": "m", "n": 1, "steps": 1, "preview": True}  # no wait when streaming


def test_a_stream_that_keeps_breaking_is_unreachable(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    answers = [httpx.ReadError("reset")] * 6
    with Client("http://svc", transport=scripted(answers, [])) as client, pytest.raises(Unreachable):
        list(client.events(ID))
    assert not answers


def test_an_abandoned_stream_is_closed():
    closed = []

    class Tracked(BrokenStream):
        def close(self):
            closed.append(True)

    def handler(request):
        body = Tracked(sse([("1-0", "queued", {}), ("2-0", "progress", {})]), False)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)

    with Client("http://svc", transport=httpx.MockTransport(handler)) as client:
        events = client.events(ID)
        assert next(events).event == "queued"
        events.close()
    assert closed == [True]


def test_api_error_fields_are_unchanged():
    answers = [(422, {}, {"detail": [{"loc": ["body", "n"], "msg": "x"}]})]
    with Client("http://svc", transport=scripted(answers, [])) as client, pytest.raises(APIError) as e:
        client.submit("m", n=0)
    assert e.value.fields == {"n": "x"}


def test_idempotency_key_and_webhook_go_with_every_try_of_a_submit():
    """`idempotency_key=` is the Idempotency-Key header of the POST, resent unchanged when a 503 is
    retried (the server makes one generation); `webhook=` (a URL, or url and events) is the body's
    "webhook" object. Both drivers send the same."""
    hook = {"url": "https://hooks.example/x", "events": ["failed"]}
    calls = [
        ("submit", ("m",), {"webhook": "https://hooks.example/x", "idempotency_key": "order-1"}),
        ("generate", ("m",), {"webhook": hook, "idempotency_key": "order-2", "timeout": 10}),
    ]
    for run in (run_sync, run_async):
        seen_headers: list = []
        answers = [RETRY, (202, {}, {**BODY, "status": "queued"}), RETRY, (200, {}, BODY)]

        def handler(request, answers=answers, seen=seen_headers):
            seen.append((request.headers.get("idempotency-key"), json.loads(request.content)))
            code, headers, body = answers.pop(0)
            return httpx.Response(code, headers=headers, json=body)

        if run is run_sync:
            with Client("http://svc", transport=httpx.MockTransport(handler), **OPTS) as client:
                client.submit(*calls[0][1], **calls[0][2])
                client.generate(*calls[1][1], **calls[1][2])
        else:

            async def main(handler=handler):
                async with AsyncClient("http://svc", transport=httpx.MockTransport(handler), **OPTS) as client:
                    await client.submit(*calls[0][1], **calls[0][2])
                    await client.generate(*calls[1][1], **calls[1][2])

            asyncio.run(main())
        assert [k for k, _ in seen_headers] == ["order-1", "order-1", "order-2", "order-2"], run
        assert [b["webhook"] for _, b in seen_headers] == [{"url": "https://hooks.example/x"}] * 2 + [hook] * 2
        assert seen_headers[0][1] == seen_headers[1][1] and seen_headers[2][1] == seen_headers[3][1]
