"""The forward's timing for the scheduler (arcdiff/worker/timing.py)."""

import pytest
import torch

from arcdiff.worker.timing import ForwardClock


def test_host_timings_are_taken_once():
    clock = ForwardClock(torch.device("cpu"))
    out = clock.run(lambda x, eta: (x, x), torch.zeros(3, 1, 2, 2), torch.zeros(3))
    assert out[0].shape == (3, 1, 2, 2)
    (rows, seconds), *more = clock.take()
    assert rows == 3 and seconds >= 0 and not more and clock.take() == []


def test_gpu_timings_are_read_once_their_forward_has_ended():
    """The CUDA path without a GPU: event pairs are taken in order, each once it has completed
    (query() never blocks), and a backlog beyond 64 is dropped rather than waited on."""

    class Event:  # the two calls the clock makes of a torch.cuda.Event
        def __init__(self, ms, done=True):
            self.ms, self.done = ms, done

        def query(self):
            return self.done

        def elapsed_time(self, end):
            return end.ms - self.ms

    clock = ForwardClock(torch.device("cpu"))
    clock.pending.extend([(4, Event(0), Event(2)), (8, Event(2), Event(5, done=False)), (4, Event(5), Event(7))])
    assert clock.take() == [(4, pytest.approx(0.002))] and len(clock.pending) == 2  # stopped at the running one
    clock.pending[0][2].done = True
    assert clock.take() == [(8, pytest.approx(0.003)), (4, pytest.approx(0.002))] and not clock.pending
    clock.pending.extend((1, Event(0, done=False), Event(1, done=False)) for _ in range(70))
    assert clock.take() == [] and len(clock.pending) == 64  # 6 dropped, none read
