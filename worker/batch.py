"""The running images of one solver, kept as one batched solver state, and the batch buckets.

The solvers in model/solvers.py are per-sample state machines whose state is a dict of tensors
with a leading batch dimension. Images join by concatenating a fresh state and leave by indexing;
the update itself is one vectorised call for the whole group, whatever step each image is at.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from model.solvers import State, draw_noise, get_solver


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

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, x_T: torch.Tensor, steps: torch.Tensor, slots: Sequence[Any], generators: Sequence[torch.Generator]) -> None:
        """Join: a fresh state for the new rows, concatenated after the running ones."""
        fresh = self.impl.init(x_T, steps)
        if self.state is None or not self.slots:
            self.state = fresh
        else:
            self.state = {k: torch.cat([self.state[k], fresh[k]]) for k in self.state}
        self.slots.extend(slots)
        if self.impl.stochastic:
            self.generators.extend(generators)

    def point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's next evaluation point (x, eta)."""
        return self.impl.point(self.state)

    def advance(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """Consume one evaluation per row; returns the rows that must leave: finished or non-finite."""
        noise = draw_noise(self.state["x"], self.generators) if self.impl.stochastic else None
        finished = self.impl.advance(self.state, x0_hat, eps_hat, noise)
        bad = ~torch.isfinite(self.state["x"]).flatten(1).all(dim=1)
        return finished | bad

    def remove(self, leave: torch.Tensor) -> tuple[list[Any], torch.Tensor]:
        """Leave: drop the masked rows; returns their owners and final x (in row order)."""
        rows = leave.nonzero().flatten().tolist()
        if not rows:
            return [], self.state["x"][:0]
        gone = set(rows)
        x = self.state["x"][leave]
        keep = ~leave
        self.state = {k: v[keep] for k, v in self.state.items()}
        owners = [self.slots[i] for i in rows]
        self.slots = [s for i, s in enumerate(self.slots) if i not in gone]
        if self.impl.stochastic:
            self.generators = [g for i, g in enumerate(self.generators) if i not in gone]
        return owners, x
