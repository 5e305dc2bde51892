"""The running images of one model's batch: per solver group, one batched solver state.

The solvers in arcdiff/model/solvers.py are per-sample state machines whose state is a dict of tensors
with a leading batch dimension. Images join by concatenating a fresh state and leave by indexing;
the update itself is one vectorised call for the whole group, whatever step each image is at.

A group may run only its first rows in a tick (the scheduler pauses batch-priority rows beside
interactive ones): the others keep their state, their step and their noise streams untouched, so
an image comes out the same whether or not it was paused.

Who leaves when is known on the host: an image needs exactly nfe(solver, steps) evaluations, so
the group counts them down in Python instead of reading the solver's "finished" mask back from
the device, which would stall a GPU's queue of kernels once per tick. Non-finite rows are found
when they leave (one check per finished batch of rows, not per tick).

RunningBatch holds a model's groups by (solver, priority), the executor's side of the scheduler's
groups: same keys, rows in admission order, so "the first rows of a group" that a plan runs are
the same rows on both sides. It gathers the rows a plan runs into one input and scatters the
network's output back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from arcdiff.model.rng import image_generator, image_seed, initial_noise
from arcdiff.model.solvers import State, draw_noise, get_solver
from arcdiff.worker.loading import PAD_ETA
from arcdiff.worker.scheduler import GroupKey


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

    def _head(self, rows: int | None) -> State:
        """The state of the first `rows` rows (views; all rows: the state itself)."""
        state = self._live()
        if rows is None or rows >= len(self.slots):
            return state
        return {k: v[:rows] for k, v in state.items()}

    def point(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next evaluation point (x, eta) of every row, or of the first `rows`."""
        return self.impl.point(self._head(rows))

    def advance(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor, rows: int | None = None) -> list[int]:
        """Consume one evaluation per row (or per row of the first `rows`, the others paused);
        returns the indices of the rows that finished."""
        state = self._live()
        m = len(self.slots) if rows is None else min(rows, len(self.slots))
        if m < len(self.slots):
            self._unalias(state)
        head = self._head(m)
        views = dict(head)
        noise = draw_noise(head["x"], self.generators[:m]) if self.impl.stochastic else None
        self.impl.advance(head, x0_hat, eps_hat, noise)
        if head is not state:
            # in-place updates went through the views; entries the solver replaced are copied back,
            # each first cloned if it is itself a view of the state (eta0 <- eta1 and the like)
            storages = {v.untyped_storage().data_ptr() for v in state.values()}
            new = {
                k: v.clone() if v.untyped_storage().data_ptr() in storages else v
                for k, v in head.items()
                if v is not views[k]
            }
            for k, v in new.items():
                state[k][:m] = v
        self.remaining[:m] = [r - 1 for r in self.remaining[:m]]
        return [i for i, r in enumerate(self.remaining[:m]) if r <= 0]

    @staticmethod
    def _unalias(state: State) -> None:
        """Give entries that share memory their own (a solver may keep one tensor under two names): the
        rows written back after a partial advance must land in one entry only."""
        seen: set[int] = set()
        for k, v in state.items():
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen:
                state[k] = v.clone()
            seen.add(ptr)

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


class RunningBatch:
    """The solver groups of one model's batch, by (solver, priority). Rows are owned by
    (generation, image index) pairs; a generation is anything with a GenerationSpec as `.spec`."""

    def __init__(self, image_shape: Sequence[int], device: torch.device):
        self.shape = tuple(image_shape)
        self.device = device
        self.groups: dict[GroupKey, SolverGroup] = {}

    def join(self, admitted: Sequence[tuple[Any, int]]) -> None:
        """Admitted images enter, each at the end of its group with a fresh state: its own
        generator seeded from (request seed, image index), its start noise, its step grid."""
        by_group: dict[GroupKey, list[tuple[Any, int]]] = {}
        for item in admitted:
            by_group.setdefault((item[0].spec.solver, item[0].spec.priority), []).append(item)
        for key, items in by_group.items():
            gens = [image_generator(image_seed(t.spec.seed, k)) for t, k in items]
            x_T = torch.stack([initial_noise(self.shape, g) for g in gens]).to(self.device)
            steps = torch.tensor([t.spec.steps for t, _ in items])  # on the host: the group counts down there
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = SolverGroup(key[0])
            group.add(x_T, steps, items, gens, [t.spec.schedule for t, _ in items])

    def gather(self, run: Sequence[tuple[GroupKey, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next points (x, eta) of the rows that run ((group, its first rows), in this order),
        padded with zero rows at PAD_ETA to `size` rows."""
        points = [self.groups[key].point(rows) for key, rows in run]
        x = torch.cat([p[0] for p in points])
        eta = torch.cat([p[1] for p in points])
        if size > len(x):
            x = torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])
            eta = torch.cat([eta, eta.new_full((size - len(eta),), PAD_ETA)])
        return x, eta

    def ran(self, run: Sequence[tuple[GroupKey, int]]) -> Iterator[tuple[Any, int, int]]:
        """(generation, image index, evaluations it had left before this one) of each row that runs,
        in gather order."""
        for key, rows in run:
            g = self.groups[key]
            for (owner, k), left in zip(g.slots[:rows], g.remaining[:rows], strict=True):
                yield owner, k, left

    def scatter(
        self, run: Sequence[tuple[GroupKey, int]], x0_hat: torch.Tensor, eps_hat: torch.Tensor
    ) -> list[tuple[GroupKey, list[Any], torch.Tensor]]:
        """Each group advances its rows that ran by their evaluation (one vectorised call per group);
        rows that finished leave: (group, their owners, their final x), per group."""
        left = []
        offset = 0
        for key, rows in run:
            g = self.groups[key]
            done = g.advance(x0_hat[offset : offset + rows], eps_hat[offset : offset + rows], rows)
            offset += rows
            if done:
                owners, xs = g.remove(done)
                left.append((key, owners, xs))
        return left

    def drop(self, closed: Callable[[Any], bool]) -> list[tuple[GroupKey, list[Any]]]:
        """Remove the rows whose generation is `closed`; returns (group, their owners), per group."""
        dropped = []
        for key, g in self.groups.items():
            rows = [i for i, (t, _k) in enumerate(g.slots) if closed(t)]
            if rows:
                dropped.append((key, g.remove(rows)[0]))
        return dropped

    def clear(self) -> None:
        """Empty the batch."""
        self.groups.clear()


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row indices as a tensor on `device`, sent from pinned memory without blocking on a GPU."""
    t = torch.tensor(rows, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
