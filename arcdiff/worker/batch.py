"""The running images of one solver, kept as one batched solver state, and the batch buckets.

The solvers in arcdiff/model/solvers.py are per-sample state machines whose state is a dict of tensors
with a leading batch dimension. Images join by concatenating a fresh state and leave by indexing;
the update itself is one vectorised call for the whole group, whatever step each image is at.

Who leaves when is known on the host: an image needs exactly nfe(solver, steps) evaluations, so
the group counts them down in Python instead of reading the solver's "finished" mask back from
the device, which would stall a GPU's queue of kernels once per tick. Non-finite rows are found
when they leave (one check per finished batch of rows, not per tick).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from arcdiff.model.solvers import State, draw_noise, get_solver


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (and max_batch itself): the shapes the network ever sees."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket that holds n images."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} images exceed the largest bucket {sizes[-1]}")


class SolverGroup:
    """Images of one model that use one solver: their state, who they are, and (ddpm) their RNGs."""

    def __init__(self, solver: str):
        self.impl = get_solver(solver)
        self.state: State | None = None
        self.slots: list[Any] = []  # one owner record per row, same order as the state
        self.generators: list[torch.Generator] = []  # per-row noise streams, stochastic solvers only
        self.remaining: list[int] = []  # per row: network evaluations still to do

    def __len__(self) -> int:
        return len(self.slots)

    def add(
        self,
        x_T: torch.Tensor,
        steps: torch.Tensor,
        slots: Sequence[Any],
        generators: Sequence[torch.Generator],
        schedules: Sequence[str] | None = None,
    ) -> None:
        """Join: a fresh state for the new rows (each with its own step count and time grid),
        concatenated after the running ones."""
        fresh = self.impl.init(x_T, steps, schedules)
        if self.state is None or not self.slots:
            self.state = fresh
        else:
            self.state = {k: torch.cat([self.state[k], fresh[k]]) for k in self.state}
        self.slots.extend(slots)
        self.remaining.extend(self.impl.nfe(int(n)) for n in steps.tolist())
        if self.impl.stochastic:
            self.generators.extend(generators)

    def _live(self) -> State:
        """The running state; a group is stepped only after add() gave it rows."""
        if self.state is None:
            raise RuntimeError("solver group has no state: add() rows before stepping it")
        return self.state

    def point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's next evaluation point (x, eta)."""
        return self.impl.point(self._live())

    def advance(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor) -> list[int]:
        """Consume one evaluation per row; returns the indices of the rows that finished."""
        state = self._live()
        noise = draw_noise(state["x"], self.generators) if self.impl.stochastic else None
        self.impl.advance(state, x0_hat, eps_hat, noise)
        self.remaining = [r - 1 for r in self.remaining]
        return [i for i, r in enumerate(self.remaining) if r <= 0]

    def remove(self, rows: Sequence[int]) -> tuple[list[Any], torch.Tensor]:
        """Leave: drop the given rows; returns their owners and final x (in row order)."""
        state = self._live()
        rows = sorted(set(rows))
        if not rows:
            return [], state["x"][:0]
        gone = set(rows)
        kept = [i for i in range(len(self.slots)) if i not in gone]
        device = state["x"].device
        x = state["x"][_index(rows, device)]
        keep = _index(kept, device)
        self.state = {k: v[keep] for k, v in state.items()}
        owners = [self.slots[i] for i in rows]
        self.slots = [self.slots[i] for i in kept]
        self.remaining = [self.remaining[i] for i in kept]
        if self.impl.stochastic:
            self.generators = [self.generators[i] for i in kept]
        return owners, x


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row indices as a tensor on `device`, sent from pinned memory without blocking on a GPU."""
    t = torch.tensor(rows, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
