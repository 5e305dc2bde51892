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

from arcdiff.contract import EditInputs
from arcdiff.model import editing
from arcdiff.model.rng import image_generator, image_seed, initial_noise
from arcdiff.model.schedule import GRID_IDS, grid_eta
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
        start: torch.Tensor | None = None,
        reverse: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
    ) -> None:
        """Join: a fresh state for the new rows (each with its own step count and time grid),
        concatenated after the running ones. Edits (model/editing.py): `start` the grid index each
        row starts at, `reverse` rows that encode, `mask`/`known` the inpainting mask and known
        image (all on the host; None: no row needs them)."""
        fresh = self.impl.init(x_T, steps, schedules, start=start, reverse=reverse)
        if mask is not None and known is not None:
            fresh["mask"], fresh["x0_known"] = mask.to(x_T.device), known.to(x_T.device)
        if self.state is None or not self.slots:
            self.state = fresh
        else:
            self.state = _concat(self.state, fresh)
        self.slots.extend(slots)
        first = [0] * len(slots) if start is None else start.tolist()
        self.remaining.extend(self.impl.nfe(int(n) - s) for n, s in zip(steps.tolist(), first, strict=True))
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
        editing.advance(self.impl, head, x0_hat, eps_hat, noise)  # with the inpainting mask, if any row has one
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
        idx = _index(rows, device)
        x = editing.composite(state, state["x"][idx], idx)  # inpainted rows: the known pixels exactly
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

    def __init__(self, image_shape: Sequence[int], device: torch.device, data_range: Sequence[float] = (-1.0, 1.0)):
        self.shape = tuple(image_shape)
        self.device = device
        self.data_range = (float(data_range[0]), float(data_range[1]))
        self.groups: dict[GroupKey, SolverGroup] = {}

    def join(self, admitted: Sequence[tuple[Any, int]]) -> None:
        """Admitted images enter, each at the end of its group with a fresh state: its own
        generator seeded from (request seed, image index), its start point, its step grid. The
        start point depends on the kind (model/editing.py): a generation starts from the seed's
        noise (or the noise it brought) at pi/2, an interpolation frame from the slerp of its ends,
        an edit from its noised input at its grid's start index (with its mask, if any), an
        encoding from its image at eta = 0 with the grid reversed."""
        by_group: dict[GroupKey, list[tuple[Any, int]]] = {}
        for item in admitted:
            by_group.setdefault((item[0].spec.solver, item[0].spec.priority), []).append(item)
        for key, items in by_group.items():
            gens = [image_generator(image_seed(t.spec.seed, k)) for t, k in items]
            rows = [self._start(t, k, g) for (t, k), g in zip(items, gens, strict=True)]
            x_T = torch.stack([r[0] for r in rows]).to(self.device)
            steps = torch.tensor([t.spec.steps for t, _ in items])  # on the host: the group counts down there
            starts = [r[1] for r in rows]
            start = torch.tensor(starts) if any(starts) else None
            reverse = torch.tensor([t.spec.kind == "encode" for t, _ in items])
            masks = [r[2] for r in rows]
            mask = known = None
            if any(mk is not None for mk in masks):
                mask = torch.stack([mk if mk is not None else torch.ones(self.shape) for mk in masks])
                known = torch.stack([r[3] if r[3] is not None else torch.zeros(self.shape) for r in rows])
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = SolverGroup(key[0])
            group.add(
                x_T,
                steps,
                items,
                gens,
                [t.spec.schedule for t, _ in items],
                start=start,
                reverse=reverse if bool(reverse.any()) else None,
                mask=mask,
                known=known,
            )

    def _pixels(self, image: Any) -> torch.Tensor:
        """uint8 (C, H, W) pixels -> floats in the model's data range."""
        lo, hi = self.data_range
        return torch.tensor(image, dtype=torch.float32) * ((hi - lo) / 255.0) + lo

    def _start(
        self, task: Any, k: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
        """One image's (x at its start, start grid index, mask, known image) on the host; its noise
        from its own generator, so it depends on its request only."""
        spec = task.spec
        inputs: EditInputs = getattr(task, "inputs", None) or EditInputs()  # decoded by the engine at submit
        if spec.kind == "encode":
            return self._pixels(inputs.image), 0, None, None
        if spec.kind == "interpolate":
            if inputs.latents is not None:
                z0, z1 = (torch.tensor(z) for z in inputs.latents)
            else:
                z0, z1 = (initial_noise(self.shape, image_generator(s)) for s in (spec.seed, spec.seed_to))
            t = editing.frames(spec.n)[k]
            return editing.slerp(z0[None], z1[None], t)[0], 0, None, None
        eps = initial_noise(self.shape, gen)
        if spec.kind == "generate":
            if inputs.latents is not None:
                return torch.tensor(inputs.latents[k]), 0, None, None
            return eps, 0, None, None
        # an edit: the input noised to the start of the grid's tail
        s0 = editing.start_index(spec.steps, spec.strength)
        eta0 = grid_eta(torch.tensor([s0]), torch.tensor([spec.steps]), torch.tensor([GRID_IDS[spec.schedule]]))
        x0_in = self._pixels(inputs.image)
        x = editing.noised(x0_in[None], eps[None], eta0)[0]
        mask = torch.tensor(inputs.mask) if inputs.mask is not None else None
        return x, s0, mask, x0_in if mask is not None else None

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


def _concat(a: State, b: State) -> State:
    """Two solver states as one: an entry only one of them has (an edit's) is given its neutral
    value for the other's rows (model/editing.py), so edits and generations share a group."""
    out = {}
    for k in a.keys() | b.keys():
        if k in a and k in b:
            out[k] = torch.cat([a[k], b[k]])
        else:
            lack = b if k in a else a
            fill = (
                torch.zeros(len(lack["x"]), dtype=torch.bool, device=lack["x"].device)
                if k == "rev"
                else editing.neutral(k, lack["x"])
            )
            out[k] = torch.cat([a[k], fill] if k in a else [fill, b[k]])
    return out


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row indices as a tensor on `device`, sent from pinned memory without blocking on a GPU."""
    t = torch.tensor(rows, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
