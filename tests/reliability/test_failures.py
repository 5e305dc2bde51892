"""Failures with real processes: a model that fails to load, results kept for their TTL, jobs that
wait too long, the per-key limit shared through Redis, and Redis killed (-9) and restarted on
the same port while the API and a worker run. Tests run in file order; the restart is last."""

import shutil
import signal
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from rq import Queue, Worker
from rq.command import send_stop_job_command
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from servicekit import RestartableRedis, start_worker, stop, wait_until, wait_workers

from arcdiff.contract import TASK, GenerationSpec

pytestmark = pytest.mark.timeout(400)

RESULT_TTL_S = 6
QUEUE_TIMEOUT_S = 5


def make_broken_model_dir(model_dir, folder):
    """tiny and tiny-eps, plus 'broken': tiny's config.json with tiny-eps's (one-head) weights."""
    for name in ("tiny", "tiny-eps"):
        shutil.copytree(model_dir / name, folder / name)
    (folder / "broken").mkdir()
    shutil.copy(model_dir / "tiny" / "config.json", folder / "broken" / "config.json")
    shutil.copy(model_dir / "tiny-eps" / "model.safetensors", folder / "broken" / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory):
    from servicekit import Api

    logs = tmp_path_factory.mktemp("failures")
    server = RestartableRedis(logs)
    worker_models = make_broken_model_dir(model_dir, tmp_path_factory.mktemp("wmodels"))
    api = Api(
        model_dir,
        logs / "api.log",
        redis_url=server.url,
        ARCDIFF_RESULT_TTL_S=str(RESULT_TTL_S),
        ARCDIFF_QUEUE_TIMEOUT_S=str(QUEUE_TIMEOUT_S),
        ARCDIFF_READY_CACHE_S="0.5",
        ARCDIFF_WAIT_TIMEOUT_S="60",
    )
    w = start_worker(
        server.url,
        worker_models,
        logs / "worker.log",
        models=("tiny", "tiny-eps", "broken"),
        max_batch=4,
        ARCDIFF_QUEUE_TIMEOUT_S=str(QUEUE_TIMEOUT_S),
        ARCDIFF_HEARTBEAT_S="1",
        ARCDIFF_WORKER_TTL_S="10",
    )
    api.wait_listening()
    wait_workers(server.url, "tiny", 1, [w])
    wait_until(lambda: api.client.get("/readyz").status_code == 200, 60, "readyz", interval=0.2)
    st = {
        "api": api,
        "redis": server,
        "worker": w,
        "worker_log": logs / "worker.log",
        "logs": logs,
        "worker_models": worker_models,
    }
    yield st
    stop(st["worker"], signal.SIGKILL, timeout=10)
    api.close()
    for log in sorted(logs.glob("worker*.log")):
        print(f"--- {log.name} ---\n" + log.read_text()[-4000:])
    server.client.close()
    server.kill()


def post_wait(api, **kw):
    body = {"model": "tiny", "steps": 3, "solver": "heun", "seed": 5, "wait": True, **kw}
    return api.client.post("/v1/generations", json=body)


def test_queue_timeout_in_embedded_mode(model_dir):
    """The in-process engine's queue: a generation that cannot start in time fails with the reason."""
    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    app = create_app(Settings(model_dir=model_dir, redis_url=None, max_batch=1, queue_timeout_s=1, torch_threads=1))
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 60, "models to load")
        long = c.post("/v1/generations", json={"model": "tiny", "steps": 1000, "solver": "rk4"}).json()
        wait_until(lambda: c.get(long["url"]).json()["status"] == "running", 30, "the long one to run")
        late = c.post("/v1/generations", json={"model": "tiny", "steps": 2, "solver": "ddim"}).json()
        gen = wait_until(lambda: (g := c.get(late["url"]).json())["status"] == "failed" and g, 20, "expiry")
        assert gen["error"].startswith("expired: waited") and c.get(long["url"]).json()["status"] == "running"


def test_overload_429_drops_nothing_accepted(model_dir):
    """A burst past the queue bound: the excess gets 429 with Retry-After, every accepted one finishes."""
    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    app = create_app(Settings(model_dir=model_dir, redis_url=None, max_batch=1, queue_limit=2, torch_threads=1))
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 60, "models to load")
        answers = [
            c.post("/v1/generations", json={"model": "tiny", "steps": 20, "solver": "rk4", "seed": i}) for i in range(8)
        ]
        accepted = [r.json()["url"] for r in answers if r.status_code == 202]
        refused = [r for r in answers if r.status_code == 429]
        assert len(accepted) + len(refused) == 8 and refused and len(accepted) >= 2
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        done = [
            wait_until(lambda u=u: (g := c.get(u).json())["status"] in ("finished", "failed") and g, 60, u)
            for u in accepted
        ]
        assert [g["status"] for g in done] == ["finished"] * len(accepted)


def test_model_that_fails_to_load_is_named_and_its_jobs_left_alone(stack):
    log = (stack["logs"] / "worker.log").read_text()
    assert "model broken failed to load" in log and "do not match the architecture" in log, log[-3000:]
    assert "does NOT serve broken" in log
    conn = stack["redis"].client
    (worker,) = Worker.all(connection=conn)
    assert sorted(worker.queue_names()) == [
        "arcdiff:tiny",
        "arcdiff:tiny-eps",
        "arcdiff:tiny-eps:batch",
        "arcdiff:tiny:batch",
    ]
    # a job for the broken model (enqueued by hand: this API does not serve it) is never taken
    spec = GenerationSpec(
        id=uuid.uuid4().hex, model="broken", steps=2, solver="ddim", seed=0, n=1, submitted_at=time.time()
    )
    job = Queue("arcdiff:broken", connection=conn, serializer=JSONSerializer).enqueue_call(
        TASK, args=(spec.to_payload(),), job_id=spec.id
    )
    r = post_wait(stack["api"])
    assert r.status_code == 200 and r.json()["status"] == "finished"
    time.sleep(1.5)
    assert Job.fetch(job.id, connection=conn, serializer=JSONSerializer).get_status() == "queued"
    conn.delete("rq:queue:arcdiff:broken")


def test_model_that_fails_to_load_in_embedded_mode(stack):
    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    app = create_app(Settings(model_dir=stack["worker_models"], redis_url=None, max_batch=4, torch_threads=1))
    with TestClient(app) as c:
        wait_until(lambda: "broken" in (c.get("/readyz").json().get("reason") or ""), 60, "models to load")
        r = c.get("/readyz")
        assert r.status_code == 503 and "model broken failed to load" in r.json()["reason"]
        r = c.post("/v1/generations", json={"model": "broken", "steps": 2, "solver": "ddim"})
        assert r.status_code == 503 and "do not match the architecture" in r.json()["detail"]
        r = c.post("/v1/generations", json={"model": "tiny", "steps": 2, "solver": "ddim", "wait": True})
        assert r.status_code == 200 and r.json()["status"] == "finished"


def test_unfetched_result_stays_for_its_ttl_then_404(stack):
    api = stack["api"]
    gen = post_wait(api, seed=11, n=2).json()
    assert gen["status"] == "finished"
    done_at = time.monotonic()
    conn = stack["redis"].client
    ttl = conn.ttl(f"rq:job:{gen['id']}")
    assert 0 < ttl <= RESULT_TTL_S, ttl
    time.sleep(RESULT_TTL_S / 2)
    for _ in range(2):  # reading it does not consume it
        again = api.client.get(gen["url"]).json()
        assert again["status"] == "finished" and again["images"] == gen["images"]
    assert api.client.get(gen["images"][1]["url"]).status_code == 200
    wait_until(lambda: api.client.get(gen["url"]).status_code == 404, RESULT_TTL_S + 10, "the result to expire")
    assert time.monotonic() - done_at >= RESULT_TTL_S - 1


def test_job_waiting_longer_than_the_queue_timeout_fails_with_the_reason(stack):
    api, conn = stack["api"], stack["redis"].client
    long = api.client.post(
        "/v1/generations", json={"model": "tiny", "steps": 1000, "solver": "rk4", "seed": 1, "n": 4}
    ).json()  # fills the worker's batch (4)
    wait_until(lambda: api.client.get(long["url"]).json()["status"] == "running", 60, "the long one to run")
    late = api.client.post("/v1/generations", json={"model": "tiny", "steps": 2, "solver": "ddim", "seed": 2}).json()
    assert api.client.get(late["url"]).json()["status"] == "queued"
    gen = wait_until(
        lambda: (g := api.client.get(late["url"]).json())["status"] == "failed" and g,
        QUEUE_TIMEOUT_S + 30,
        "the waiting one to expire",
        interval=0.2,
    )
    assert gen["error"].startswith("expired: waited") and "ARCDIFF_QUEUE_TIMEOUT_S" in gen["error"]
    send_stop_job_command(conn, long["id"])
    # the worker takes it once there is room, and records the failure in RQ with the reason
    job = wait_until(
        lambda: (j := Job.fetch(late["id"], connection=conn, serializer=JSONSerializer)).get_status() == "failed" and j,
        60,
        "the worker to fail it",
    )
    assert "expired: waited" in job.latest_result().exc_string
    assert (
        api.client.get(long["url"]).json()["status"] == "canceled"
    )  # stop-job is how a running generation is canceled


def test_rate_limit_is_shared_by_api_processes_through_redis(stack, model_dir):
    """Two more API instances on the same Redis: images asked for through one count in the other."""
    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    def app():
        return TestClient(
            create_app(
                Settings(
                    model_dir=model_dir,
                    redis_url=stack["redis"].url,
                    rate_limit_images_per_min=5,
                    api_keys="shared-key",
                )
            )
        )

    body, head = {"model": "tiny", "steps": 2, "solver": "ddim"}, {"authorization": "Bearer shared-key"}
    with app() as a, app() as b:
        for _attempt in range(2):  # a minute boundary between the requests resets the window: once more then
            first = a.post("/v1/generations", json={**body, "n": 3}, headers=head).status_code
            second = b.post("/v1/generations", json={**body, "n": 2}, headers=head).status_code
            third = b.post("/v1/generations", json=body, headers=head)
            fourth = a.post("/v1/generations", json=body, headers=head)
            if (first, second, third.status_code, fourth.status_code) == (202, 202, 429, 429):
                break
            time.sleep(max(0.0, 60 - time.time() % 60) + 0.1)
        else:
            pytest.fail(f"not shared: {first}, {second}, {third.status_code}, {fourth.status_code}")
        assert 1 <= int(third.headers["retry-after"]) <= 60
        assert stack["redis"].client.keys("arcdiff:rate:*"), "the counter is not in Redis"


class Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_job_is_refused_never_unpickled(stack, tmp_path):
    """Someone with access to Redis pushes a stock-RQ (pickle) job: the worker reads jobs as JSON
    only, so it fails the job with the reason and the payload never runs."""
    conn = stack["redis"].client
    marker = tmp_path / "pwned"
    job = Queue("arcdiff:tiny", connection=conn).enqueue_call(TASK, args=(Evil(marker),), job_id=uuid.uuid4().hex)
    wait_until(
        lambda: (
            conn.zscore("rq:failed:arcdiff:tiny", job.id) is not None
            or conn.hget(f"rq:job:{job.id}", "status") == b"failed"
        ),
        60,
        "the worker to fail the job",
    )
    assert not marker.exists(), "the pickle ran"
    reason = Job.fetch(job.id, connection=conn, serializer=JSONSerializer).latest_result().exc_string
    assert "cannot read the job's data" in reason and "JSON" in reason, reason
    assert stack["worker"].poll() is None
    assert post_wait(stack["api"]).json()["status"] == "finished"  # and the worker still serves


def test_weights_are_read_from_safetensors_only(model_dir, tmp_path):
    """A pickle (torch.save) where model.safetensors should be is refused with the reason, unrun."""
    import torch

    from arcdiff.model.format import ModelFormatError
    from arcdiff.model.registry import ModelRegistry

    marker = tmp_path / "pwned"
    shutil.copytree(model_dir / "tiny", tmp_path / "m" / "evil")
    torch.save({"weights": Evil(marker)}, tmp_path / "m" / "evil" / "model.safetensors")
    registry = ModelRegistry(tmp_path / "m")
    assert "evil" in registry.errors and "cannot read safetensors" in registry.errors["evil"]
    with pytest.raises((ModelFormatError, KeyError)):
        registry.load("evil")
    assert not marker.exists()


def test_job_of_a_killed_worker_with_no_retries_left_fails_with_a_reason(stack):
    """SIGKILL mid-batch and no retry left: another worker's maintenance fails the job (never
    left started), and GET says why. (With retries it runs again: tests/worker/test_rq_worker.py.)"""
    conn, api = stack["redis"].client, stack["api"]
    spec = GenerationSpec(
        id=uuid.uuid4().hex, model="tiny", steps=1000, solver="rk4", seed=3, n=2, submitted_at=time.time()
    )
    Queue("arcdiff:tiny", connection=conn, serializer=JSONSerializer).enqueue_call(
        TASK, args=(spec.to_payload(),), job_id=spec.id, timeout=600, result_ttl=600, failure_ttl=600
    )
    wait_until(lambda: api.client.get(f"/v1/generations/{spec.id}").json()["status"] == "running", 60, "it to run")
    stack["worker"].kill()
    stack["worker"].wait(10)
    log = stack["logs"] / "worker-after-kill.log"
    stack["worker"] = start_worker(
        stack["redis"].url,
        stack["worker_models"],
        log,
        models=("tiny", "tiny-eps"),
        max_batch=4,
        ARCDIFF_HEARTBEAT_S="1",
        ARCDIFF_MAINTENANCE_S="1",
        ARCDIFF_WORKER_TTL_S="10",
        ARCDIFF_QUEUE_TIMEOUT_S=str(QUEUE_TIMEOUT_S),
    )
    stack["worker_log"] = log
    gen = wait_until(
        lambda: (g := api.client.get(f"/v1/generations/{spec.id}").json())["status"] == "failed" and g,
        90,
        "the abandoned job to fail",
        interval=0.5,
    )
    assert "Abandoned" in gen["error"], gen["error"]  # RQ's words: "... due to AbandonedJobError ..."
    assert spec.id not in StartedJobRegistry("arcdiff:tiny", connection=conn).get_job_ids()


def test_redis_killed_and_restarted(stack):
    """kill -9 Redis: readiness and new requests answer 503 (with Retry-After), never 500 or a hang;
    Redis back on the same port (empty: no persistence here): the worker registers again and the
    API serves again, with no restart of either."""
    api, server = stack["api"], stack["redis"]
    assert post_wait(api).status_code == 200
    server.kill()
    t0 = time.monotonic()
    r = api.client.post("/v1/generations", json={"model": "tiny", "steps": 2, "solver": "ddim"})
    assert r.status_code == 503, r.text  # at once, even while readiness is still cached as ready
    wait_until(lambda: api.client.get("/readyz").status_code == 503, 5, "readiness to notice (0.5 s cache)")
    for _ in range(3):
        r = api.client.get("/readyz")
        assert r.status_code == 503 and "Redis" in r.json()["reason"], r.text
        r = api.client.post("/v1/generations", json={"model": "tiny", "steps": 2, "solver": "ddim"})
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert api.client.get("/v1/generations/" + "a" * 32).status_code == 503
        time.sleep(0.5)
    assert time.monotonic() - t0 < 30, "requests hung while Redis was down"
    assert api.client.get("/healthz").status_code == 200
    server.start()
    wait_until(lambda: api.client.get("/readyz").status_code == 200, 90, "the API to be ready again", interval=0.5)
    r = post_wait(api, seed=77)
    assert r.status_code == 200 and r.json()["status"] == "finished", r.text
    assert stack["worker"].poll() is None and stack["api"].proc.poll() is None
    log = stack["worker_log"].read_text()
    assert "registering again" in log
