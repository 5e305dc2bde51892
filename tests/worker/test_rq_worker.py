"""`arcdiff worker` processes against a real redis-server: RQ lifecycle, batching, SIGTERM drain."""

import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
from rq import Queue, Retry, Worker
from rq.command import send_stop_job_command
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from servicekit import (
    REPO,
    assert_images_match,
    free_port,
    start_worker,
    stop,
    wait_until,
    wait_workers,
    worker_gauge,
)

from arcdiff.contract import TASK, GenerationSpec, queue_name


@pytest.fixture
def conn(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def workers(redis_url, model_dir, tmp_path):
    """Start worker processes; all are stopped (SIGKILL if need be) after the test."""
    procs = []

    def start(metrics_port=0, **env):
        log = tmp_path / f"worker{len(procs)}.log"
        p = start_worker(redis_url, model_dir, log, max_batch=4, metrics_port=metrics_port, **env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        stop(p, signal.SIGKILL, timeout=10)
    for i in range(len(procs)):
        print(f"--- worker{i}.log ---\n" + (tmp_path / f"worker{i}.log").read_text()[-4000:])


def enqueue(conn, steps, solver="rk4", seed=0, n=1, payload=None, func=TASK, retries=1, priority="interactive"):
    spec = GenerationSpec(
        id=uuid.uuid4().hex,
        model="tiny",
        steps=steps,
        solver=solver,
        seed=seed,
        n=n,
        submitted_at=time.time(),
        priority=priority,
    )
    q = Queue(queue_name("tiny", priority), connection=conn, serializer=JSONSerializer)
    return q.enqueue_call(
        func,
        args=(payload if payload is not None else spec.to_payload(),),
        job_id=spec.id,
        timeout=600,
        result_ttl=600,
        failure_ttl=600,
        retry=Retry(max=retries),
    )


def fetch(conn, job):
    return Job.fetch(job.id, connection=conn, serializer=JSONSerializer)


def status(conn, job):
    return fetch(conn, job).get_status()


def wait_status(conn, job, wanted, timeout=120):
    return wait_until(lambda: status(conn, job) in wanted, timeout, f"job {job.id} to be {wanted}", interval=0.05)


def test_jobs_share_the_batch_with_an_honest_rq_lifecycle(conn, workers, redis_url, model_dir):
    """Short jobs join a long one's batch and finish while it runs; the long one is started (with
    heartbeats) until RQ's stop-job command stops it; results are the reference images."""
    w = workers(ARCDIFF_HEARTBEAT_S="0.3")
    wait_workers(redis_url, "tiny", 1, [w])
    long = enqueue(conn, steps=1000, solver="rk4", seed=1, n=2)
    wait_status(conn, long, {"started"})
    started = StartedJobRegistry("arcdiff:tiny", connection=conn)
    assert long.id in started.get_job_ids()
    beat = fetch(conn, long).last_heartbeat
    shorts = [enqueue(conn, steps=3, solver=s, seed=10 + i, n=1) for i, s in enumerate(("ddim", "ddpm"))]
    for j in shorts:
        wait_status(conn, j, {"finished", "failed"}, timeout=60)
        assert status(conn, j) == "finished"
    assert status(conn, long) == "started", "short jobs waited for the long one"
    (worker,) = Worker.all(connection=conn)
    assert worker.get_state() == "busy" and worker.queue_names() == ["arcdiff:tiny", "arcdiff:tiny:batch"]
    wait_until(lambda: fetch(conn, long).last_heartbeat > beat, 10, "a heartbeat of the running job")
    for job, (steps, solver, seed) in zip(shorts, ((3, "ddim", 10), (3, "ddpm", 11)), strict=True):
        res = fetch(conn, job).return_value()
        assert_images_match(res["images"], model_dir, "tiny", steps, solver, seed)
        assert res["metrics"]["worker"] == worker.name and res["metrics"]["device"] == "cpu"
        assert max(res["metrics"]["batch_sizes"]) >= 3, f"did not share the long job's batch: {res['metrics']}"
    send_stop_job_command(conn, long.id)
    wait_status(conn, long, {"stopped", "failed", "finished"}, timeout=30)
    assert status(conn, long) == "stopped"
    assert "canceled on request" in fetch(conn, long).latest_result().exc_string
    assert not started.get_job_ids()
    info = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "-u", redis_url, "--only-queues"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "arcdiff:tiny" in info.stdout and "2 finished" in info.stdout, info.stdout + info.stderr


def test_bad_jobs_fail_with_the_reason(conn, workers, redis_url):
    w = workers()
    wait_workers(redis_url, "tiny", 1, [w])
    bad_steps = enqueue(conn, steps=1, payload={"id": "x"})
    bad_func = enqueue(conn, steps=2, func="os.system")
    good = enqueue(conn, steps=2)
    for job in (bad_steps, bad_func, good):
        wait_status(conn, job, {"finished", "failed"}, timeout=60)
    assert status(conn, good) == "finished"
    for job, reason in ((bad_steps, "missing field"), (bad_func, "expected function")):
        assert status(conn, job) == "failed"
        assert reason in fetch(conn, job).latest_result().exc_string


def test_an_interactive_job_is_taken_beside_a_batch_queue_that_fills_the_worker(conn, workers, redis_url, model_dir):
    """Batch jobs fill the engine (max batch 4) and more wait in the batch queue; an interactive job
    is still taken at once and finishes while they run (the batch rows pause for it on this CPU)."""
    port = free_port()
    w = workers(metrics_port=port)
    wait_workers(redis_url, "tiny", 1, [w])
    running = [enqueue(conn, steps=1000, seed=i, n=2, priority="batch") for i in range(2)]
    waiting = enqueue(conn, steps=2, priority="batch")
    wait_running_images(port, 4)
    inter = enqueue(conn, steps=3, solver="ddim", seed=21)
    wait_status(conn, inter, {"finished", "failed"}, timeout=60)
    assert status(conn, inter) == "finished"
    assert_images_match(fetch(conn, inter).return_value()["images"], model_dir, "tiny", 3, "ddim", 21)
    assert [status(conn, j) for j in running] == ["started", "started"]
    assert status(conn, waiting) == "queued", "a batch job was taken into a full batch"
    for j in running:
        send_stop_job_command(conn, j.id)
    wait_status(conn, waiting, {"finished"}, timeout=60)


def wait_running_images(port, count, timeout=60):
    """Until the worker's engine has `count` images in its running batch (its metrics port): a job
    RQ calls started may still wait for the engine's next tick, and SIGTERM gives such jobs back."""
    wait_until(
        lambda: worker_gauge(port, "arcdiff_worker_running_images", model="tiny") == count,
        timeout,
        f"{count} images running in the engine",
        interval=0.02,
    )


def test_sigterm_finishes_running_jobs_and_leaves_the_rest_queued(conn, workers, redis_url):
    port = free_port()
    w = workers(metrics_port=port, ARCDIFF_DRAIN_TIMEOUT_S="60")
    wait_workers(redis_url, "tiny", 1, [w])
    # 4 images fill the batch; 600 evaluations each outlast the wait below on any CPU, and the drain
    running = [enqueue(conn, steps=150, seed=i, n=2) for i in range(2)]
    waiting = [enqueue(conn, steps=2, seed=10 + i) for i in range(3)]
    for j in running:
        wait_status(conn, j, {"started"})
    wait_running_images(port, 4)
    w.send_signal(signal.SIGTERM)
    assert w.wait(90) == 0
    assert [status(conn, j) for j in running] == ["finished", "finished"]
    assert [status(conn, j) for j in waiting] == ["queued"] * 3
    assert not StartedJobRegistry("arcdiff:tiny", connection=conn).get_job_ids()
    assert not Worker.all(connection=conn), "the stopped worker is still registered"


def test_sigterm_mid_run_loses_no_job(conn, workers, redis_url, model_dir):
    """Drain timeout passes while jobs still sample: they go back to the queue, in order, and another
    worker finishes every one of them."""
    port = free_port()
    w = workers(metrics_port=port, ARCDIFF_DRAIN_TIMEOUT_S="0.2")
    wait_workers(redis_url, "tiny", 1, [w])
    # 1000 evaluations per image: far longer than the 0.2 s drain, whatever the CPU
    jobs = [enqueue(conn, steps=250, seed=i, n=2) for i in range(2)] + [
        enqueue(conn, steps=2, seed=10 + i) for i in range(3)
    ]
    for j in jobs[:2]:
        wait_status(conn, j, {"started"})
    wait_running_images(port, 4)
    w.send_signal(signal.SIGTERM)
    assert w.wait(60) == 0
    assert not StartedJobRegistry("arcdiff:tiny", connection=conn).get_job_ids(), "jobs left in the started state"
    q = Queue("arcdiff:tiny", connection=conn, serializer=JSONSerializer)
    assert q.get_job_ids() == [j.id for j in jobs], "requeued jobs lost their place"
    w2 = workers()
    wait_workers(redis_url, "tiny", 1, [w2])
    for j in jobs:
        wait_status(conn, j, {"finished", "failed"}, timeout=180)
    assert [status(conn, j) for j in jobs] == ["finished"] * 5
    assert_images_match(fetch(conn, jobs[0]).return_value()["images"], model_dir, "tiny", 250, "rk4", 0)


def test_jobs_of_a_killed_worker_are_run_again(conn, workers, redis_url, model_dir):
    """SIGKILL: nothing is drained, but the job's started entry expires after a few missed
    heartbeats and another worker's maintenance puts it back on the queue (RQ retry)."""
    w = workers(ARCDIFF_HEARTBEAT_S="0.3")
    wait_workers(redis_url, "tiny", 1, [w])
    job = enqueue(conn, steps=80, seed=4, n=2)
    wait_status(conn, job, {"started"})
    killed = fetch(conn, job).worker_name
    w.kill()
    w.wait(10)
    time.sleep(1)
    assert status(conn, job) == "started"  # nobody has noticed yet
    w2 = workers(ARCDIFF_MAINTENANCE_S="1")
    wait_workers(redis_url, "tiny", 1, [w2])
    wait_status(conn, job, {"finished", "failed"}, timeout=120)
    assert status(conn, job) == "finished"
    res = fetch(conn, job).return_value()
    assert res["metrics"]["worker"] != killed
    assert_images_match(res["images"], model_dir, "tiny", 80, "rk4", 4)
