"""The network's forward, timed for the scheduler's forward-time estimates.

On a GPU with CUDA events, read back at a later tick once their forward has ended (no sync per
tick); elsewhere by the host's clock (on MPS that times the launch only).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch

from arcdiff.worker.loading import Forward

BACKLOG = 64  # GPU timings not yet read beyond this many are dropped rather than waited on


class ForwardClock:
    """Runs forwards on one device and hands their measured times on, (rows, seconds)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ready: list[tuple[int, float]] = []  # measured, not yet taken
        self.pending: deque[tuple[int, Any, Any]] = deque()  # (rows, start, end) CUDA events to read

    def run(self, forward: Forward, x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = forward(x, eta)
            end.record()
            self.pending.append((x.shape[0], start, end))
            return out
        t0 = time.perf_counter()
        out = forward(x, eta)
        self.ready.append((x.shape[0], time.perf_counter() - t0))
        return out

    def take(self) -> list[tuple[int, float]]:
        """The timings measured since the last call: the host's, and the GPU's whose forwards have
        ended (oldest first; query() does not block)."""
        while self.pending and (len(self.pending) > BACKLOG or self.pending[0][2].query()):
            rows, start, end = self.pending.popleft()
            if end.query():
                self.ready.append((rows, start.elapsed_time(end) / 1000.0))
        taken, self.ready = self.ready, []
        return taken
