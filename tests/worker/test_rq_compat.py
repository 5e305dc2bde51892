"""The RQ behaviour the batching worker relies on, pinned on a real redis-server through
arcdiff.worker.rq_compat (the one module that touches RQ's internals). If RQ changes one of these,
a test here fails before a worker misbehaves; pyproject.toml pins RQ to the versions checked."""

import signal
import time

import pytest
import redis
from rq import Queue, Retry, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from arcdiff.worker import rq_compat


@pytest.fixture
def conn(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def queues(conn):
    return [Queue(name, connection=conn, serializer=JSONSerializer) for name in ("arcdiff:a", "arcdiff:b")]


@pytest.fixture
def worker(conn, queues):
    w = SimpleWorker(queues, connection=conn, serializer=JSONSerializer, name="compat-test")
    w.register_birth()
    yield w
    w.register_death()


def enqueue(queue, retries=0):
    # JSON jobs name their function as a string; these are never run, only started and ended
    retry = Retry(max=retries) if retries else None
    return queue.enqueue_call(
        "arcdiff.worker.tasks.generate", args=({"x": 1},), result_ttl=600, failure_ttl=600, retry=retry
    )


def start(worker, queue, job):
    """What BatchingWorker.execute_job does before handing a job to the engine."""
    got = Queue.dequeue_any([queue], None, connection=worker.connection, serializer=JSONSerializer)
    assert got is not None and got[0].id == job.id
    execution = worker.prepare_execution(got[0])
    worker.prepare_job_execution(got[0])
    assert got[0].get_status() == JobStatus.STARTED
    return got[0], execution


def fetch(conn, job):
    return Job.fetch(job.id, connection=conn, serializer=JSONSerializer)


def test_a_stop_request_ends_the_loop_before_it_takes_a_job(queues, conn):
    job = enqueue(queues[0])
    worker = SimpleWorker(queues, connection=conn, serializer=JSONSerializer, name="compat-stop")
    assert not rq_compat.stop_requested(worker)
    rq_compat.request_stop(worker)
    assert rq_compat.stop_requested(worker)
    assert worker.work(burst=True) is False  # returned without executing anything
    assert fetch(conn, job).get_status() == JobStatus.QUEUED


def test_ordered_queues_are_the_worker_queues_in_dequeue_order(worker, queues):
    assert [q.name for q in rq_compat.ordered_queues(worker)] == ["arcdiff:a", "arcdiff:b"]
    rr = SimpleWorker(queues, connection=worker.connection, serializer=JSONSerializer, name="compat-rr")
    rr._dequeue_strategy = "round_robin"  # as work(dequeue_strategy="round_robin") sets it
    rr.reorder_queues(reference_queue=queues[0])
    assert [q.name for q in rq_compat.ordered_queues(rr)] == ["arcdiff:b", "arcdiff:a"]


def test_registration_is_seen_and_its_loss_too(worker, conn):
    assert rq_compat.is_registered(worker)
    conn.flushall()  # Redis restarted without persistence
    assert not rq_compat.is_registered(worker)
    worker.register_birth()
    assert rq_compat.is_registered(worker)


def test_finish_job_records_the_result_and_leaves_the_started_registry(worker, queues, conn):
    job, execution = start(worker, queues[0], enqueue(queues[0]))
    assert job.id in StartedJobRegistry(queues[0].name, connection=conn).get_job_ids()
    rq_compat.finish_job(worker, job, queues[0], execution, {"images": [], "nfe": 4})
    got = fetch(conn, job)
    assert got.get_status() == JobStatus.FINISHED
    assert got.return_value() == {"images": [], "nfe": 4}  # stored as JSON, read back as JSON
    assert job.id not in StartedJobRegistry(queues[0].name, connection=conn).get_job_ids()


def test_a_failed_job_is_failed_with_its_reason_and_not_retried(worker, queues, conn):
    job, execution = start(worker, queues[0], enqueue(queues[0], retries=2))
    rq_compat.mark_failed(job)
    job.retries_left = 0  # the worker's verdict is final
    worker.handle_execution_ended(job, queues[0], job.failure_callback_timeout)
    worker.handle_job_failure(job, queues[0], exc_string="image 0 became non-finite", execution=execution)
    got = fetch(conn, job)
    assert got.get_status() == JobStatus.FAILED
    assert got.latest_result().exc_string == "image 0 became non-finite"
    assert job.id not in StartedJobRegistry(queues[0].name, connection=conn).get_job_ids()
    assert job.id not in queues[0].get_job_ids()


def test_a_job_stopped_on_request_is_recorded_stopped_not_failed(worker, queues, conn):
    job, execution = start(worker, queues[1], enqueue(queues[1], retries=2))
    rq_compat.mark_stopped_on_request(worker, job.id)
    rq_compat.mark_failed(job)
    worker.handle_job_failure(job, queues[1], exc_string="stopped on request", execution=execution)
    got = fetch(conn, job)
    assert got.get_status() == JobStatus.STOPPED
    assert job.id not in queues[1].get_job_ids()  # stopped jobs are never retried
    # the mark is used once: the next failure is a failure
    other, execution = start(worker, queues[1], enqueue(queues[1]))
    rq_compat.mark_failed(other)
    worker.handle_job_failure(other, queues[1], exc_string="boom", execution=execution)
    assert fetch(conn, other).get_status() == JobStatus.FAILED


def test_the_batching_worker_leaves_its_loop_after_max_idle_time(redis_url, conn, model_dir):
    """RQ's max_idle_time holds for the batching worker's own dequeue loop: idle that long, it
    leaves the loop (teardown included) instead of waiting for jobs forever."""
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.worker.engine import Engine, EngineConfig
    from arcdiff.worker.rq_worker import BatchingWorker

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # work() replaces them
    engine = Engine({"tiny": ModelRegistry(model_dir).load("tiny")}, EngineConfig(max_batch=2)).start()
    try:
        worker = BatchingWorker(engine, connection=conn, name="compat-idle")
        t0 = time.monotonic()
        assert worker.work(max_idle_time=2) is False
        assert 2 <= time.monotonic() - t0 < 30
        assert not rq_compat.is_registered(worker)  # teardown ran: it registered its death
    finally:
        engine.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class CommandWorker(SimpleWorker):
    """RQ's worker with the batching worker's unsubscribe (arcdiff/worker/rq_worker.py)."""

    def unsubscribe(self):
        rq_compat.stop_command_thread(self)
        super().unsubscribe()


def test_unsubscribe_does_not_wait_for_the_command_thread(conn, queues):
    """The race that kept a drained worker alive for up to a minute: the command thread has read a
    message and is back in get_message(timeout=60) when unsubscribe() runs. RQ's order (send
    UNSUBSCRIBE, then stop and join the thread) can wait for that timeout; with the thread told
    to stop first, it ends on the reply to UNSUBSCRIBE."""
    w = CommandWorker(queues, connection=conn, serializer=JSONSerializer, name="unsubscribe-test")
    handled = []
    w.handle_payload = lambda message: handled.append(message)  # before subscribe(), which binds it
    w.subscribe()
    conn.publish(w.pubsub_channel_name, '{"command": "noop"}')
    deadline = time.monotonic() + 10
    while not handled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handled, "the command thread never read the message"
    start = time.monotonic()
    w.unsubscribe()
    assert time.monotonic() - start < 5, "unsubscribe waited for the command thread"
    assert not w.pubsub_thread.is_alive()
