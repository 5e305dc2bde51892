"""The real stack over HTTP: `arcdiff serve --redis` under uvicorn, a real redis-server, and one then
two `arcdiff worker` processes. Tests run in file order: no worker, one worker, two workers, then
one of the two stopped with SIGTERM mid-run."""

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from rq.job import Job
from rq.serializers import JSONSerializer
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

from arcdiff.model.solvers import SOLVERS

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(redis_server, model_dir, tmp_path_factory):
    """Redis (emptied), the API (Redis mode) and a place to start workers; stops them all."""
    redis_server.client.flushall()
    logs = tmp_path_factory.mktemp("stack")
    port = free_port()
    api = start_api(port, model_dir, logs / "api.log", redis_url=redis_server.url, ARCDIFF_WAIT_TIMEOUT_S="60")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    workers = []

    wait_api_ready(api, client, logs / "api.log", 90, path="/healthz", what="the API to listen")

    def add_worker(**env):
        p = start_worker(
            redis_server.url,
            model_dir,
            logs / f"worker{len(workers)}.log",
            models=("tiny", "tiny-eps"),
            max_batch=8,
            **env,
        )
        workers.append(p)
        wait_workers(redis_server.url, "tiny", len([w for w in workers if w.poll() is None]), workers)
        return p

    yield {"client": client, "add_worker": add_worker, "workers": workers, "redis": redis_server, "logs": logs}
    client.close()
    for p in workers:
        stop(p, signal.SIGKILL, timeout=10)
    stop(api)
    for f in sorted(logs.iterdir()):
        print(f"--- {f.name} ---\n{f.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def one_worker(stack):
    stack["add_worker"](ARCDIFF_DRAIN_TIMEOUT_S="0.5")
    wait_until(lambda: stack["client"].get("/readyz").status_code == 200, 30, "readyz with a worker", interval=0.2)
    return stack


@pytest.fixture(scope="module")
def two_workers(one_worker):
    one_worker["add_worker"]()
    return one_worker


def poll(client, gen_id, timeout=180):
    return poll_generation(client, gen_id, timeout, interval=0.05)


def test_without_a_worker_generations_wait_in_the_queue_until_one_starts(stack, model_dir):
    """Scale to zero: with Redis up and no worker the API is ready and queues generations; a worker
    started later finishes them."""
    client, logs = stack["client"], stack["logs"]
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["mode"] == "redis", r.text
    assert r.json()["workers"] == {"tiny": 0, "tiny-eps": 0}
    assert {m["name"]: m["workers"] for m in client.get("/v1/models").json()} == {"tiny": 0, "tiny-eps": 0}
    body = {"model": "tiny", "steps": 3, "solver": "heun", "seed": 21, "n": 2}
    r = client.post("/v1/generations", json=body)
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["workers"] == 0, r.text
    gen_id = r.json()["id"]
    assert "workers" not in client.get(f"/v1/generations/{gen_id}").json()  # only answers to a POST say it
    r = client.post("/v1/generations", json={"model": "tiny", "steps": 0, "solver": "ddim"})
    assert r.status_code == 422 and r.json()["message"].startswith("steps: ")
    # a wait=true request held while no worker exists is answered once one starts (wait timeout 60 s)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, "/v1/generations", json={**body, "seed": 22, "wait": True})
        redis_client = stack["redis"].client
        wait_until(lambda: redis_client.llen("rq:queue:arcdiff:tiny") == 2, 30, "both generations queued", interval=0.1)
        assert client.get(f"/v1/generations/{gen_id}").json()["status"] == "queued" and not held.done()
        late = start_worker(stack["redis"].url, model_dir, logs / "late-worker.log", models=("tiny",), max_batch=8)
        try:
            waited = held.result(timeout=120)
            # 200 when the worker started within the wait timeout, else 202 (a slow machine): either way it finishes
            assert waited.status_code in (200, 202), waited.text
            waited = waited.json() if waited.status_code == 200 else poll(client, waited.json()["id"])
            assert waited["status"] == "finished", waited
            assert_images_match(waited["images"], model_dir, "tiny", 3, "heun", 22)
            gen = poll(client, gen_id)
            assert gen["status"] == "finished", gen
            assert_images_match(gen["images"], model_dir, "tiny", 3, "heun", 21)
            wait_until(
                lambda: (
                    {m["name"]: m["workers"] for m in client.get("/v1/models").json()} == {"tiny": 1, "tiny-eps": 0}
                ),
                10,
                "the late worker counted",
                interval=0.2,
            )
        finally:
            assert stop(late) == 0
    # gone again: the next tests start from no worker
    wait_until(lambda: client.get("/readyz").json()["workers"]["tiny"] == 0, 10, "the worker unregistered")


def test_strict_readiness_wants_a_worker_per_model(stack, model_dir):
    """ARCDIFF_READY_REQUIRES_WORKERS: out of rotation and refusing generations without workers."""
    from fastapi.testclient import TestClient

    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    settings = Settings(model_dir=model_dir, redis_url=stack["redis"].url, ready_requires_workers=True)
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["mode"] == "redis"
        assert "no worker serving tiny, tiny-eps" in r.json()["reason"], r.json()
        r = c.post("/v1/generations", json={"model": "tiny", "steps": 2, "solver": "ddim"})
        assert r.status_code == 503 and "no worker serving tiny" in r.json()["detail"] and r.headers["retry-after"]
        assert 'arcdiff_generations_rejected_total{reason="not_ready"}' in c.get("/metrics").text


def test_one_worker_mixed_requests_life_cycle_and_no_head_of_line_blocking(one_worker, model_dir):
    client = one_worker["client"]
    # 1200 network evaluations: seconds on any CPU, so the short ones must pass it to finish first
    long = client.post("/v1/generations", json={"model": "tiny", "steps": 300, "solver": "rk4", "seed": 3}).json()
    assert long["status"] == "queued"
    wait_until(lambda: client.get(long["url"]).json()["status"] == "running", 60, "the long one to run", interval=0.02)
    bodies = [
        {"model": "tiny", "steps": 1 + i % 3, "solver": s, "seed": 100 + i, "n": 1 + i % 2}
        for i, s in enumerate(SOLVERS)
    ]
    ids = [client.post("/v1/generations", json=b).json()["id"] for b in bodies]
    gens = [poll(client, i) for i in ids]
    assert client.get(long["url"]).json()["status"] == "running", "short requests waited for the long one"
    for body, gen in zip(bodies, gens, strict=True):
        assert gen["status"] == "finished", gen
        assert_images_match(
            gen["images"], model_dir, "tiny", body["steps"], body["solver"], body["seed"], gen["schedule"]
        )
        assert max(gen["metrics"]["batch_sizes"]) > gen["n"], f"ran alone: {gen['metrics']}"
        assert gen["metrics"]["device"] == "cpu" and gen["metrics"]["worker"]
    done = poll(client, long["id"])
    assert done["status"] == "finished" and done["nfe"] == 1200
    assert_images_match(done["images"], model_dir, "tiny", 300, "rk4", 3)


def test_wait_png_and_image_urls_through_redis(one_worker, model_dir):
    client = one_worker["client"]
    r = client.post(
        "/v1/generations", json={"model": "tiny-eps", "steps": 3, "solver": "euler", "seed": 9, "n": 2, "wait": True}
    )
    assert r.status_code == 200 and r.json()["status"] == "finished"
    assert_images_match(r.json()["images"], model_dir, "tiny-eps", 3, "euler", 9)
    r = client.post(
        "/v1/generations", json={"model": "tiny", "steps": 3, "solver": "heun", "seed": 9, "n": 2, "wait": True}
    )
    assert r.status_code == 200, r.text
    gen = r.json()
    assert gen["status"] == "finished" and gen["nfe"] == 6
    for im in gen["images"]:
        raw = client.get(im["url"])
        assert raw.headers["content-type"] == "image/png" and png_info(raw.content) == ("PNG:L", (8, 8))
    assert_images_match(gen["images"], model_dir, "tiny", 3, "heun", 9)
    r = client.post(
        "/v1/generations",
        json={"model": "tiny", "steps": 3, "solver": "heun", "seed": 10, "wait": True},
        headers={"accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == client.get(gen["images"][1]["url"]).content  # seed 10 = image 1 of seed 9
    assert "sample;dur=" in r.headers["server-timing"]
    assert client.get("/v1/generations/" + "f" * 32).status_code == 404


def test_priority_travels_through_redis_on_its_own_queue(one_worker, model_dir):
    client, conn = one_worker["client"], one_worker["redis"].client
    body = {"model": "tiny", "steps": 3, "solver": "ddpm", "seed": 5, "n": 2, "wait": True}
    gen = client.post("/v1/generations", json={**body, "priority": "batch"}).json()
    assert gen["status"] == "finished" and gen["priority"] == "batch", gen
    assert client.get(gen["url"]).json()["priority"] == "batch"
    assert_images_match(gen["images"], model_dir, "tiny", 3, "ddpm", 5)
    job = Job.fetch(gen["id"], connection=conn, serializer=JSONSerializer)
    assert job.origin == "arcdiff:tiny:batch" and job.args[0]["priority"] == "batch"
    assert job.args[0]["client"].startswith("addr:")  # who asked, for the per-key cap; no secret
    inter = client.post("/v1/generations", json=body).json()
    assert inter["priority"] == "interactive"
    assert Job.fetch(inter["id"], connection=conn, serializer=JSONSerializer).origin == "arcdiff:tiny"


def test_two_workers_share_the_queue(two_workers, model_dir):
    client = two_workers["client"]
    bodies = [{"model": "tiny", "steps": 12, "solver": "rk4", "seed": 1000 + 10 * i, "n": 4} for i in range(6)]
    ids = [client.post("/v1/generations", json=b).json()["id"] for b in bodies]
    gens = [poll(client, i) for i in ids]
    for body, gen in zip(bodies, gens, strict=True):
        assert gen["status"] == "finished", gen
        assert_images_match(gen["images"], model_dir, "tiny", 12, "rk4", body["seed"])
    workers = {g["metrics"]["worker"] for g in gens}
    assert len(workers) == 2, f"one worker did everything: {workers}"
    assert any(max(g["metrics"]["batch_sizes"]) == 8 for g in gens), [g["metrics"]["batch_sizes"] for g in gens]


def test_sigterm_one_of_two_workers_mid_run_loses_no_generation(two_workers, model_dir):
    client, first = two_workers["client"], two_workers["workers"][0]
    # each worker holds at most 8 images, so with all four long ones running each worker holds two;
    # they last seconds, longer than the 0.5 s drain, so the stopped worker must hand its two back
    bodies = [{"model": "tiny", "steps": 250, "solver": "rk4", "seed": 2000 + 10 * i, "n": 4} for i in range(4)]
    bodies += [{"model": "tiny", "steps": 2, "solver": "ddpm", "seed": 3000 + i, "n": 1} for i in range(4)]
    ids = [client.post("/v1/generations", json=b).json()["id"] for b in bodies]
    wait_until(
        lambda: all(client.get(f"/v1/generations/{i}").json()["status"] == "running" for i in ids[:4]),
        60,
        "long generations to run",
        interval=0.05,
    )
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0
    gens = [poll(client, i) for i in ids]
    for body, gen in zip(bodies, gens, strict=True):
        assert gen["status"] == "finished", gen
        assert_images_match(
            gen["images"], model_dir, "tiny", body["steps"], body["solver"], body["seed"], gen["schedule"]
        )
    import redis
    from rq.registry import StartedJobRegistry

    conn = redis.Redis.from_url(two_workers["redis"].url)
    assert not StartedJobRegistry("arcdiff:tiny", connection=conn).get_job_ids()
    conn.close()
    log = (two_workers["logs"] / "worker0.log").read_text()
    assert "got SIGTERM" in log and "requeueing" in log, "the stopped worker held nothing to requeue"


def test_unreachable_redis_is_503_not_500(model_dir):
    """In-process app pointed at a closed port: not ready, POST refused with Retry-After, GET too."""
    from fastapi.testclient import TestClient

    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    closed = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(Settings(model_dir=model_dir, redis_url=closed))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "Redis unreachable" in r.json()["reason"]
        r = c.post("/v1/generations", json={"model": "tiny", "steps": 2, "solver": "ddim"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert c.get("/v1/generations/" + "a" * 32).status_code == 503
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models").status_code == 200
