"""One long-lived thread per process for all torch work: loading, warm-up and the engine's ticks.

Why one: on a CPU, torch's intra-op parallelism is OpenMP (libgomp), which keeps a pool of
worker threads per thread that starts parallel work. While the pool threads fit the cores they
spin between parallel regions and pick up the next one at once; once a second thread has its own
pool (say, the main thread that loaded the model) there are more pool threads than cores and
libgomp makes them sleep instead, so every region pays a wake-up, which at small batches can cost more
than the forward itself (figures: docs/performance.md#figures-behind-the-defaults).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class DeviceThread:
    """Runs callables, one at a time, on one dedicated daemon thread (a daemon, so that a process
    that exits without closing its engine is not held up by the engine's loop)."""

    def __init__(self, name: str = "arcdiff-device"):
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self._thread.name

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args, kwargs = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the device thread and return its result (exceptions propagate)."""
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the callables already submitted; with a timeout, wait that long for the
        thread to end (a daemon thread still inside torch when the interpreter exits can crash it)."""
        self._jobs.put(None)
        if timeout is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
