"""Every use of RQ's internals by the batching worker, in one place.

RQ's worker runs one job at a time and has no public hooks for what the batching worker does:
stop its loop from a signal handler without raising, finish or fail a job long after
`execute_job` returned, or mark one of many held jobs stopped. These helpers do it through RQ's
private members; tests/worker/test_rq_compat.py pins each behaviour on a real Redis, and
pyproject.toml pins RQ to the versions those tests cover. A new RQ version needs only this module
(and its tests) checked.
"""

from __future__ import annotations

from typing import Any

from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.worker.base import BaseWorker, signal_name
from rq.worker_registration import REDIS_WORKER_KEYS

__all__ = [
    "finish_job",
    "is_registered",
    "mark_failed",
    "mark_stopped_on_request",
    "ordered_queues",
    "request_stop",
    "signal_name",
    "stop_command_thread",
    "stop_requested",
]


def request_stop(worker: BaseWorker) -> None:
    """Make RQ's loop end at its next turn (`work()` checks the flag before each dequeue) without
    raising: RQ's own request_stop raises StopRequested from a signal handler when idle, which
    could land halfway through a Redis call."""
    worker._stop_requested = True


def stop_requested(worker: BaseWorker) -> bool:
    return bool(worker._stop_requested)


def ordered_queues(worker: BaseWorker) -> list[Queue]:
    """The worker's queues in the order its dequeue strategy wants them tried now."""
    return list(worker._ordered_queues)


def is_registered(worker: BaseWorker) -> bool:
    """Whether Redis still lists the worker (a Redis restarted without persistence forgets it)."""
    return bool(worker.connection.sismember(REDIS_WORKER_KEYS, worker.key))


def mark_stopped_on_request(worker: BaseWorker, job_id: str) -> None:
    """The next handle_job_failure of `job_id` records it STOPPED (not failed) and never retries
    it, as RQ does for its stop-job command (which assumes the one job of a work horse)."""
    worker._stopped_job_id = job_id


def mark_failed(job: Job) -> None:
    """The job's status in memory, as RQ's own failure path sets it before recording the failure
    (handle_job_failure then writes it to Redis)."""
    job._status = JobStatus.FAILED


def finish_job(worker: BaseWorker, job: Job, queue: Queue, execution: Any, result: Any) -> None:
    """Record a job that was started with prepare_execution as finished with `result` (stored with
    the worker's serializer), out of the StartedJobRegistry, success callback run: what RQ does
    when a job function returns."""
    worker._finalize_success(job, queue, execution, result)


def stop_command_thread(worker: BaseWorker) -> None:
    """Tell the thread that reads the worker's command channel to stop, without waiting for it,
    before RQ's unsubscribe().

    RQ sends UNSUBSCRIBE, then stops the thread (redis-py 8's stop() joins it). When the reply to
    UNSUBSCRIBE wakes the thread before its flag is cleared, it blocks again in
    get_message(timeout=60) and the join waits for that: a drained worker then outlived its grace
    period and was SIGKILLed (seen in the container smoke test: docs/performance.md#figures-behind-the-defaults).
    With the flag cleared first, the thread ends on that reply."""
    thread = getattr(worker, "pubsub_thread", None)
    if thread is None:
        return
    try:
        thread.stop(timeout=0)  # redis-py >= 8: clear the flag, join for 0 s
    except TypeError:
        thread.stop()  # older redis-py: stop() only clears the flag
