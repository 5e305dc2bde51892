"""Progress, previews and cancel over HTTP: `arcdiff serve` under uvicorn, in Redis mode (a real
redis-server, an `arcdiff worker` process and two API processes) and in embedded mode, followed
with the Python client's event streams (sync and async) and raw server-sent events."""

import asyncio
import signal

import httpx
import pytest
from httpx_sse import connect_sse
from servicekit import (
    assert_images_match,
    free_port,
    png_info,
    poll_generation,
    start_api,
    start_worker,
    stop,
    wait_api_ready,
    wait_until,
    wait_workers,
)

from arcdiff.client import AsyncClient, Client, GenerationCanceled

pytestmark = pytest.mark.timeout(300)

LONG = {"model": "tiny", "steps": 1000, "solver": "rk4", "seed": 5, "n": 2, "preview": True}  # 8000 evaluations


def _stack(mode, redis_server, model_dir, logs):
    """(the API's base URLs, an HTTP client on the first, the processes); Redis mode has two APIs."""
    procs, bases = [], []
    env = {"ARCDIFF_MAX_BATCH": "2", "ARCDIFF_WAIT_TIMEOUT_S": "60", "ARCDIFF_MODELS": "tiny"}
    if mode == "redis":
        redis_server.client.flushall()
        procs.append(start_worker(redis_server.url, model_dir, logs / "worker.log", models=("tiny",), max_batch=2))
        wait_workers(redis_server.url, "tiny", 1, procs)
    for i in range(2 if mode == "redis" else 1):
        port = free_port()
        redis_url = redis_server.url if mode == "redis" else None
        api = start_api(port, model_dir, logs / f"api{i}.log", redis_url=redis_url, **env)
        procs.append(api)
        bases.append(f"http://127.0.0.1:{port}")
        with httpx.Client(base_url=bases[-1], timeout=60) as h:
            wait_api_ready(api, h, logs / f"api{i}.log")
    return bases, httpx.Client(base_url=bases[0], timeout=60), procs


@pytest.fixture(scope="module", params=["redis", "embedded"])
def stack(request, redis_server, model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp(f"events-{request.param}")
    bases, http, procs = _stack(request.param, redis_server, model_dir, logs)
    client = Client(bases[0])
    yield {
        "mode": request.param,
        "base": bases[0],
        "bases": bases,
        "http": http,
        "client": client,
        "redis": redis_server,
    }
    client.close()
    http.close()
    for p in procs:
        stop(p, signal.SIGTERM, timeout=30)
    for f in sorted(logs.iterdir()):
        print(f"--- {f.name} ---\n{f.read_text()[-3000:]}")


def test_long_generation_streams_progress_and_previews_and_is_canceled_freeing_its_slot(stack, model_dir):
    http, client = stack["http"], stack["client"]
    long = client.submit(**LONG)
    assert long["status"] == "queued"
    events = client.events(long["id"])
    first = next(events)
    assert first.event == "queued" and first.id
    progress, previews, queued = [], [], None
    for ev in events:
        if ev.event == "progress":
            progress.append(ev.data)
        elif ev.event == "preview":
            previews.append(ev.data)
        else:
            assert ev.terminal, ev
            break
        if queued is None and len(progress) >= 3 and {p["index"] for p in previews} == {0, 1}:
            # the batch (2 rows) is full: another generation waits for a slot
            queued = client.submit("tiny", 3, "ddim", seed=77)
            assert http.get(queued["url"]).json()["status"] == "queued"
            canceled = http.delete(long["url"])
            assert canceled.status_code == 200, canceled.text
            assert canceled.json()["status"] == "canceled"
    # the terminal event carries the generation, as GET shows it
    assert ev.event == "canceled" and ev.data == http.get(long["url"]).json()
    assert ev.data["status"] == "canceled" and ev.data["images"] == []
    done = [p["nfe_done"] for p in progress]
    assert done == sorted(done) and len(set(done)) == len(done) and 0 < done[-1] < 8000
    assert all(p["nfe_total"] == 8000 and p["images_done"] == 0 for p in progress)
    for p in previews:
        assert png_info(p["png_base64"]) == ("PNG:L", (8, 8)) and 1 <= p["nfe_done"] <= 4000
    # the slot went to the waiting generation, which ran with nothing else in the batch
    gen = poll_generation(http, queued["id"], 60, 0.05)
    assert gen["status"] == "finished" and gen["metrics"]["batch_sizes"] == [1], gen
    assert_images_match(gen["images"], model_dir, "tiny", 3, "ddim", 77)
    # canceling again answers the same; the images never come
    again = http.delete(long["url"])
    assert again.status_code == 200 and again.json()["status"] == "canceled"
    assert http.get(f"{long['url']}/images/0.png").status_code == 409


def test_cancel_queued_finished_and_unknown(stack):
    http, client = stack["http"], stack["client"]
    long = client.submit(**{**LONG, "preview": False})
    wait_until(lambda: http.get(long["url"]).json()["status"] == "running", 60, "the long one to run", 0.02)
    waiting = client.submit("tiny", 2, "euler", seed=1)
    assert http.get(waiting["url"]).json()["status"] == "queued"
    body = client.cancel(waiting["id"])
    assert body["status"] == "canceled" and body["id"] == waiting["id"]
    assert [ev.event for ev in client.events(waiting["id"])] == ["queued", "canceled"]
    with pytest.raises(GenerationCanceled):
        client._result(client.cancel(long["id"]), 0)
    # it never ran, not even once the batch was free
    finished = client.generate("tiny", 2, "ddim", seed=3)
    assert http.get(waiting["url"]).json()["status"] == "canceled"
    if stack["mode"] == "redis":
        from rq.job import Job

        job = Job.fetch(waiting["id"], connection=stack["redis"].client)
        assert job.get_status() == "canceled" and job.started_at is None
    r = http.delete(f"/v1/generations/{finished.id}")
    assert r.status_code == 409 and r.json()["status"] == "finished" and "already finished" in r.json()["message"]
    r = http.delete("/v1/generations/" + "0" * 32)
    assert r.status_code == 404 and r.json()["message"]
    assert http.delete("/v1/generations/not-an-id").status_code == 404
    assert http.get("/v1/generations/" + "0" * 32 + "/events").status_code == 404
    # a finished generation's stream ends with its body
    evs = list(client.events(finished.id))
    assert evs[-1].event == "finished" and evs[-1].data["images"][0]["png_base64"]
    assert [e.event for e in evs if e.event == "progress"] and evs[0].event == "queued"


def test_a_client_that_reconnects_with_last_event_id_resumes(stack):
    """It resumes after the last event it saw; in Redis mode through the other API process."""
    http, base = stack["http"], stack["base"]
    gen = http.post("/v1/generations", json={"model": "tiny", "steps": 200, "solver": "rk4", "seed": 9}).json()
    seen = []
    with httpx.Client(base_url=base, timeout=60) as h, h.stream("GET", f"{gen['url']}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("id:"):
                seen.append(line[3:].strip())
            if len(seen) == 3:
                break  # drop the connection mid-stream
    rest = []
    with (
        httpx.Client(base_url=stack["bases"][-1], timeout=60) as h,
        connect_sse(h, "GET", f"{gen['url']}/events", headers={"Last-Event-ID": seen[-1]}) as source,
    ):
        for sse in source.iter_sse():
            rest.append(sse)
            if sse.event in ("finished", "failed", "canceled"):
                break
    assert rest and rest[-1].event == "finished"
    assert seen[-1] not in [s.id for s in rest[:-1]], "resumed at or before the last event seen"
    assert all(s.event != "queued" for s in rest), "replayed from the start"
    ids = [s.id for s in rest[:-1]]
    key = (lambda i: tuple(int(p) for p in i.split("-"))) if stack["mode"] == "redis" else int
    assert sorted(ids, key=key) == ids and key(ids[0]) > key(seen[-1])


def test_async_client_follows_a_generation(stack, model_dir):
    async def follow():
        async with AsyncClient(stack["base"]) as client:
            gen = await client.submit("tiny", 40, "heun", seed=21, n=2, preview=True)
            return [ev async for ev in client.events(gen["id"])]

    events = asyncio.run(follow())
    assert events[0].event == "queued" and events[-1].event == "finished"
    kinds = {ev.event for ev in events}
    assert {"progress", "preview"} <= kinds
    last = [ev.data for ev in events if ev.event == "progress"][-1]
    assert last == {"nfe_done": 160, "nfe_total": 160, "images_done": 2}
    assert_images_match(events[-1].data["images"], model_dir, "tiny", 40, "heun", 21)
