"""Samplers that integrate from eta = pi/2 (noise) to eta = 0 (data) on a per-sample time grid.

Every solver is written as a per-sample state machine advanced one network evaluation at a time:

    state = solver.init(x_T, steps, schedule)     # per-sample tensors, leading batch dim
    x, eta = solver.point(state)                 # where each sample wants its next evaluation
    x0_hat, eps_hat = denoiser(x, eta)
    done = solver.advance(state, x0_hat, eps_hat, noise)

Samples in one state may be at different steps, stages, grids (schedule.GRID_IDS) and step
counts, so a worker can run many requests in one batch and let samples join and leave at every
evaluation. A state is a plain dict of tensors (concatenate to join, index to leave); the solver
objects hold no state, so any number of requests can share them. `sample()` is the thin loop over
this for one batch.

How each solver consumes (x0_hat, eps_hat) matters for a dual-head model, whose x is not exactly
cos(eta) x0_hat + sin(eta) eps_hat (3-5% RMS off on the bundled `mnist`). `Solver.pair` decides it
in one place (`Solver.inputs`):
- "projected": schedule.consistent_pair, the pair on the constraint with the heads' velocity
  v_hat. Every solver that forms its update from x0 and/or eps uses it (ddim, ddpm, the
  DPM-Solver++ family, UniPC): then their updates are discretisations of the same velocity ODE
  that euler/heun/rk4 integrate, and converge to its solution. With the heads as predicted,
  ddim re-applies the heads' disagreement with x at every step (its error against a reference
  trajectory grows with steps on `mnist`) and dpmpp2m follows the x0 head's own ODE (its error
  stalls); figures in arcdiff/eval/convergence.py's table (docs/evaluation.md).
- euler, heun, rk4 use the velocity form, v_hat = -sin(eta) x0_hat + cos(eta) eps_hat (equation
  13), which the projection leaves unchanged.
For a one-head model with an unclipped derived head the pair is already consistent and the
projection changes nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import torch

from arcdiff.model import solver_names
from arcdiff.model.denoiser import DenoiserFn
from arcdiff.model.schedule import (
    ETA_MAX,
    GRID_IDS,
    consistent_pair,
    expand_like,
    grid_eta,
    grid_etas,
    log_snr_half,
    velocity,
)

State = dict[str, torch.Tensor]
GRIDS = solver_names.GRIDS


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 per-sample coefficient, cast to x's dtype and shaped to broadcast against it."""
    return expand_like(v.to(x.dtype), x)


def grid_ids(schedule: str | Sequence[str] | torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor:
    """Per-sample grid ids (long, shape (b,)) from a time grid's name, a name per sample, or ids."""
    if schedule is None:
        schedule = "uniform"
    if isinstance(schedule, torch.Tensor):
        ids = schedule.to(device=device, dtype=torch.long)
    else:
        names = [schedule] if isinstance(schedule, str) else list(schedule)
        bad = [g for g in names if g not in GRID_IDS]
        if bad:
            raise ValueError(f"unknown schedule {bad[0]!r}; expected one of {', '.join(GRIDS)}")
        ids = torch.tensor([GRID_IDS[g] for g in names], dtype=torch.long, device=device)
    return ids.expand(b).clone()


class Solver:
    """Base for the solvers: a name, its network evaluations per step, and the state machine."""

    name: str = ""
    nfe_per_step: int = 1
    stochastic: bool = False
    pair: str = "predicted"  # "predicted" or "projected": how advance() consumes the two heads

    def nfe(self, steps: int) -> int:
        return steps * self.nfe_per_step

    def variant(self, pair: str) -> Solver:
        """The same solver consuming the heads as `pair` (for measuring the choice)."""
        if pair not in ("predicted", "projected"):
            raise ValueError(f"unknown pair {pair!r}")
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.pair = pair
        return other

    def init(
        self,
        x_T: torch.Tensor,
        steps: torch.Tensor,
        schedule: str | Sequence[str] | torch.Tensor | None = None,
        etas: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        reverse: torch.Tensor | None = None,
    ) -> State:
        """A state for samples starting at x_T; `steps` is one step count per sample, `schedule`
        the time grid's name (solver_names.GRIDS; or one per sample, or grid ids). `etas`
        (B, steps + 1), decreasing, replaces the named grid with explicit points (tests against
        other implementations; all rows the same length).

        Editing (arcdiff/model/editing.py): `start`, per sample, the grid index to start at (an
        image-to-image edit runs the grid's tail from eta = grid[start], x_T the noised input
        there); `reverse`, per sample, reads the grid backwards, from eta = 0 up to pi/2 (encoding:
        x_T is the image, the result its noise latent). Only solvers whose update holds in both
        directions take `reverse` (solver_names.ENCODE_SOLVERS)."""
        b = x_T.shape[0]
        if start is None:
            i = torch.zeros(b, dtype=torch.long, device=x_T.device)
        else:
            i = start.to(device=x_T.device, dtype=torch.long).expand(b).clone()
        n = steps.to(device=x_T.device, dtype=torch.long).expand(b).clone()
        st: State = {"x": x_T.clone(), "i": i, "n": n, "grid": grid_ids(schedule, b, x_T.device)}
        if etas is not None:
            st["etas"] = etas.to(device=x_T.device, dtype=torch.float64).expand(b, -1).clone()
        if reverse is not None:
            if etas is not None:
                raise ValueError("reverse reads a named grid backwards; pass explicit etas increasing instead")
            st["rev"] = reverse.to(device=x_T.device, dtype=torch.bool).expand(b).clone()
        # the current step's ends are kept in the state rather than recomputed at every call
        st.update(eta0=self._grid(st, i), eta1=self._grid(st, i + 1))
        return st

    @staticmethod
    def _grid(st: State, i: torch.Tensor) -> torch.Tensor:
        if "etas" in st:
            return st["etas"].gather(1, i.clamp(max=st["etas"].shape[1] - 1)[:, None])[:, 0]
        if "rev" in st:  # encoding: index i of a reversed grid is point n - i of the grid
            i = torch.where(st["rev"], st["n"] - i, i)
        return grid_eta(i, st["n"], st["grid"])

    def _etas(self, st: State) -> tuple[torch.Tensor, torch.Tensor]:
        """(eta_i, eta_{i+1}) in float64 for every sample's current step."""
        return st["eta0"], st["eta1"]

    @classmethod
    def _next_step(cls, st: State, stepped: torch.Tensor | None = None) -> torch.Tensor:
        """Move the samples in `stepped` (all if None) to their next step; returns the finished mask."""
        if stepped is None:
            st["i"] = st["i"] + 1
            st["eta0"] = st["eta1"]
            st["eta1"] = cls._grid(st, st["i"] + 1)
        else:
            st["i"] = st["i"] + stepped.long()
            st["eta0"] = torch.where(stepped, st["eta1"], st["eta0"])
            st["eta1"] = torch.where(stepped, cls._grid(st, st["i"] + 1), st["eta1"])
        return st["i"] >= st["n"]

    def inputs(self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x0, eps) a one-stage solver's update uses, from an evaluation at (st["x"], eta0)."""
        x = st["x"]
        x0_hat, eps_hat = x0_hat.to(x.dtype), eps_hat.to(x.dtype)
        if self.pair == "projected":
            return consistent_pair(x, x0_hat, eps_hat, st["eta0"].to(x.dtype))
        return x0_hat, eps_hat

    def point(self, st: State) -> tuple[torch.Tensor, torch.Tensor]:
        eta, _ = self._etas(st)
        return st["x"], eta.to(st["x"].dtype)

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Consume one evaluation per sample; returns the mask of samples now finished."""
        raise NotImplementedError


class RungeKutta(Solver):
    """Explicit Runge-Kutta on dx/deta = -sin(eta) x0_hat + cos(eta) eps_hat (velocity form).

    State: x at the step's start, k (one velocity per stage), the stage index, the step index.
    """

    def __init__(self, name: str, a: Sequence[Sequence[float]], b: Sequence[float], c: Sequence[float]):
        self.name = name
        self.nfe_per_step = len(b)
        s = len(b)
        a_full = [list(row) + [0.0] * (s - len(row)) for row in a]
        self.a = torch.tensor(a_full, dtype=torch.float64)  # (S, S), row j: weights for stage j's point
        self.b = torch.tensor(b, dtype=torch.float64)
        self.c = torch.tensor(c, dtype=torch.float64)
        # the tableau on each device it was used on: a copy per evaluation would be a host-to-device
        # transfer (and, from pageable memory, a stall) every tick on a GPU
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tableau(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, c) on `device`, copied once."""
        t = self._on_device.get(device)
        if t is None:
            t = self._on_device[device] = (self.a.to(device), self.b.to(device), self.c.to(device))
        return t

    def init(self, x_T, steps, schedule=None, etas=None, start=None, reverse=None) -> State:  # as Solver.init
        st = super().init(x_T, steps, schedule, etas, start, reverse)
        st["k"] = x_T.new_zeros((x_T.shape[0], self.nfe_per_step, *x_T.shape[1:]))
        st["stage"] = torch.zeros_like(st["i"])
        return st

    def _step(self, st: State) -> tuple[torch.Tensor, torch.Tensor]:
        eta0, eta1 = self._etas(st)
        return eta0, eta1 - eta0  # h < 0: we integrate towards eta = 0

    def _combine(self, st: State, weights: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x + h * sum_j weights[:, j] k_j, with per-sample weights of shape (B, S)."""
        w = (weights * h[:, None]).to(st["x"].dtype)
        return st["x"] + torch.einsum("bs,bs...->b...", w, st["k"])

    def point(self, st: State) -> tuple[torch.Tensor, torch.Tensor]:
        eta0, h = self._step(st)
        stage = st["stage"]
        a, _, c = self._tableau(h.device)
        eta = eta0 + c[stage] * h
        return self._combine(st, a[stage], h), eta.to(st["x"].dtype)

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        eta0, h = self._step(st)
        stage = st["stage"]
        _, b, c_stage = self._tableau(h.device)
        eta = (eta0 + c_stage[stage] * h).to(st["x"].dtype)
        v_hat = velocity(x0_hat, eps_hat, eta).to(st["x"].dtype)
        st["k"][torch.arange(len(stage), device=stage.device), stage] = v_hat
        complete = stage + 1 == self.nfe_per_step
        x_next = self._combine(st, b.expand(len(stage), -1), h)
        st["x"] = torch.where(expand_like(complete, x_next), x_next, st["x"])
        st["stage"] = torch.where(complete, torch.zeros_like(stage), stage + 1)
        return self._next_step(st, complete)


class DDIM(Solver):
    """x_next = cos(eta_next) x0 + sin(eta_next) eps: exact for a constant (x0, eps); on the
    projected pair the same as the first-order exponential integrator in lambda."""

    name = "ddim"
    pair = "projected"

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        _, eta1 = self._etas(st)
        x0, eps = self.inputs(st, x0_hat, eps_hat)
        st["x"] = _per_sample(torch.cos(eta1), x0) * x0 + _per_sample(torch.sin(eta1), x0) * eps
        return self._next_step(st)


class DDPM(Solver):
    """Ancestral sampling with the DDPM posterior variance between consecutive grid points.

    With alpha_bar = cos^2(eta) the step from eta to eta' has beta = 1 - cos^2(eta)/cos^2(eta') and
    posterior variance var = sin^2(eta')/sin^2(eta) * beta. At eta = pi/2 this gives var =
    sin^2(eta') (x_next = cos x0 + sin z), at eta' = 0 var = 0 (x_next = x0).
    The noise z comes from each sample's own generator (the caller passes it in). On the projected
    pair: with the heads as predicted the heads' disagreement with x is re-applied at every step
    and the samples degrade as steps grow.
    """

    name = "ddpm"
    stochastic = True
    pair = "projected"

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        if noise is None:
            raise ValueError("ddpm is stochastic: advance() needs a noise tensor")
        eta0, eta1 = self._etas(st)
        x0, eps = self.inputs(st, x0_hat, eps_hat)
        s0, c1, s1 = torch.sin(eta0), torch.cos(eta1), torch.sin(eta1)
        beta = 1.0 - torch.cos(eta0) ** 2 / c1**2
        var = (s1**2 / s0**2 * beta).clamp(min=0.0)
        st["x"] = (
            _per_sample(c1, x0) * x0
            + _per_sample((s1**2 - var).clamp(min=0.0).sqrt(), x0) * eps
            + _per_sample(var.sqrt(), x0) * noise.to(x0.dtype)
        )
        return self._next_step(st)


def _lambda(eta: torch.Tensor) -> torch.Tensor:
    """lambda = log(cot eta) in float64, exactly -inf at pi/2 and +inf at 0 (float cos(pi/2) is
    6e-17, not 0, which would make the first step merely very long instead of infinite)."""
    lam = log_snr_half(eta)
    lam = torch.where(eta >= ETA_MAX, torch.full_like(lam, -math.inf), lam)
    return torch.where(eta <= 0, torch.full_like(lam, math.inf), lam)


def _alpha_sigma(eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos eta, sin eta) with exact zeros at pi/2 and 0."""
    alpha = torch.where(eta >= ETA_MAX, torch.zeros_like(eta), torch.cos(eta))
    sigma = torch.where(eta <= 0, torch.zeros_like(eta), torch.sin(eta))
    return alpha, sigma


class StepTables:
    """The per-step update coefficients of one multistep solver for every (grid, steps) it has run.

    A multistep update's coefficients depend only on where a sample is on its grid, not on its
    pixels, so they are computed once per (grid id, step count), a block of `steps` rows, and each
    step reads its row with one gather. Computed at every step instead, they cost a few dozen small
    tensor ops per solver group and tick: most of the engine's own work when several solvers share
    a batch, and on a GPU one kernel launch each. Blocks are appended and never move, so a state
    keeps its rows' offsets. One table per (device, dtype): the coefficients are computed in float64
    and rounded once to the dtype the update runs in, as the update itself would round them. The
    size is bounded by the grids and step counts requested: every grid at every step count up to
    1000 would be 1.5 M rows of at most a dozen numbers; a service sees a handful.
    """

    def __init__(self, build: Callable[[torch.Tensor], torch.Tensor]):
        self._build = build  # (R, n + 1) grids of eta, float64 -> (R, n, C) coefficient rows, float64
        self._lock = threading.Lock()  # the engine's thread and an embedded caller may both add blocks
        self._offsets: dict[tuple[torch.device, torch.dtype], dict[tuple[int, int, int], int]] = {}
        self._data: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def offsets(
        self,
        grid: Sequence[int],
        steps: Sequence[int],
        device: torch.device,
        dtype: torch.dtype,
        start: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Where each sample's block starts (long, on `device`), building the blocks not there yet,
        less the sample's start index, so that row + i is the row of its step i. A sample that starts
        at grid index s > 0 (an edit) has a block of its own: the grid's tail from s is a grid of
        n - s steps with no history before it, whose coefficients (warm-up order, lower-order end)
        differ from those of the full grid's rows."""
        key = (device, dtype)
        starts = list(start) if start is not None else [0] * len(grid)
        wanted = list(zip(grid, steps, starts, strict=True))
        with self._lock:
            known = self._offsets.setdefault(key, {})
            missing = sorted(set(wanted) - known.keys())
            if missing:
                old = self._data.get(key)
                size = 0 if old is None else len(old)
                blocks = [] if old is None else [old]
                for g, n, s in missing:
                    blocks.append(self._build(grid_etas(n, g)[s:][None])[0].to(device=device, dtype=dtype))
                    known[(g, n, s)] = size
                    size += n - s
                self._data[key] = torch.cat(blocks)
            rows = [known[p] - p[2] for p in wanted]
        return torch.tensor(rows, dtype=torch.long).to(device)

    def data(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Every block on (device, dtype): (rows, C)."""
        return self._data[(device, dtype)]


class Multistep(Solver):
    """Base of the exponential integrators in lambda = log(cot eta) that reuse past x0 estimates
    (data-prediction form, DPM-Solver++ and UniPC), on the projected pair.

    State (besides the base's): the x0 estimates at the last `history` grid points (m, newest
    first), and where the sample's coefficient rows are: `row`, its block's offset in the solver's
    StepTables (named grids), or `coef`, its own rows (explicit etas). The coefficients are
    `coefficients()` of a step context: the step's ends, and lam, the lambdas of the last
    `history` grid points (-inf where there is none yet: pi/2 is lambda = -inf, so the point at
    pure noise contributes nothing to a difference quotient and the formulas reduce to lower order
    by themselves). With h = lambda' - lambda, e^{-h} = tan(eta')/tan(eta) is finite at both ends;
    the last step (to eta = 0, h = inf) is always first order and returns the x0 estimate.
    """

    pair = "projected"
    order: int = 2
    history: int = 1

    def __init__(self) -> None:
        self.tables = StepTables(self._coefficient_rows)

    def init(self, x_T, steps, schedule=None, etas=None, start=None, reverse=None) -> State:  # as Solver.init
        st = super().init(x_T, steps, schedule, etas, start, reverse)
        b = x_T.shape[0]
        st["m"] = x_T.new_zeros((b, self.history, *x_T.shape[1:]))
        if reverse is not None:
            raise ValueError(f"{self.name} cannot integrate towards eta = pi/2 (encoding): see ENCODE_SOLVERS")
        if etas is None:
            # from the host-side arguments: no device sync at admission
            grid = grid_ids(schedule, b, torch.device("cpu")).tolist()
            n = steps.cpu().long().expand(b).tolist()
            s0 = None if start is None else start.cpu().long().expand(b).tolist()
            st["row"] = self.tables.offsets(grid, n, x_T.device, x_T.dtype, s0)
        elif start is not None:
            raise ValueError("start with explicit etas: pass the tail of the grid as etas instead")
        else:
            st["coef"] = self._coefficient_rows(st["etas"]).to(x_T.dtype)
        return st

    def _coefficients(self, st: State) -> torch.Tensor:
        """Every sample's coefficient row for its current step: (B, C) in x's dtype."""
        if "row" in st:
            return self.tables.data(st["x"].device, st["x"].dtype)[st["row"] + st["i"]]
        i = st["i"].clamp(max=st["coef"].shape[1] - 1)
        return st["coef"][torch.arange(len(i), device=i.device), i]

    def _coefficient_rows(self, etas: torch.Tensor) -> torch.Tensor:
        """(R, n, C) float64: the coefficients of every step of R grids, etas (R, n + 1) float64."""
        r, n = etas.shape[0], etas.shape[1] - 1
        return self.coefficients(self._step_context(etas)).reshape(r, n, -1)

    def _step_context(self, etas: torch.Tensor) -> State:
        """What the coefficients of step i depend on, for every step of R grids (R * n rows, the
        steps of one grid consecutive): i, n, the step's ends eta0 and eta1, the previous point
        eta_prev (eta0 at i = 0) and lam (R * n, history): lambda at points i - 1, i - 2, ..."""
        r, n = etas.shape[0], etas.shape[1] - 1
        h = self.history
        lam_points = torch.cat([torch.full((r, h), -math.inf, dtype=torch.float64), _lambda(etas[:, :-1])], dim=1)
        lam = torch.stack([lam_points[:, h - 1 - k : h - 1 - k + n] for k in range(h)], dim=-1)
        i = torch.arange(n).repeat(r)
        return {
            "i": i,
            "n": torch.full_like(i, n),
            "eta0": etas[:, :-1].reshape(-1),
            "eta1": etas[:, 1:].reshape(-1),
            "eta_prev": torch.cat([etas[:, :1], etas[:, :-2]], dim=1).reshape(-1),
            "lam": lam.reshape(r * n, h),
        }

    def coefficients(self, ctx: State) -> torch.Tensor:
        """(N, C) float64 coefficients of the update from a step context (_step_context)."""
        raise NotImplementedError

    def _step_order(self, st: State) -> torch.Tensor:
        """The order of every sample's current step: warm-up (i + 1), first order into eta = 0."""
        order = torch.minimum(st["i"] + 1, torch.full_like(st["i"], self.order))
        return torch.where(st["eta1"] <= 0, torch.ones_like(order), order)

    @staticmethod
    def _push(st: State, m: torch.Tensor) -> None:
        st["m"] = torch.cat([m[:, None], st["m"][:, :-1]], dim=1)


def _combine(x: torch.Tensor, c_x: torch.Tensor, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """c_x x + sum_j w[:, j] m[:, j] with per-sample coefficients (c_x (B,), w (B, K))."""
    return _per_sample(c_x, x) * x + torch.einsum("bk,bk...->b...", w.to(x.dtype), m)


class DPMSolverPP(Multistep):
    """DPM-Solver++ (Lu et al. 2022), multistep, orders 2 and 3, as in diffusers'
    DPMSolverMultistepScheduler (midpoint form) with lower_order_final:

    x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D0 - alpha' (e^{-h} - 1) ... ; with r_k = h_k / h,
    2M: x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) (D0 + D1 / 2), D1 = (m0 - m1) / r0;
    3M adds the second difference (diffusers' multistep_dpm_solver_third_order_update). Ratios are
    written as q = h / h_k, which is 0 next to the infinite first step. Below 15 steps the
    second-to-last step is at most second order (diffusers' lower_order_final).
    `sde`: DPM-Solver++(2M) SDE: x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D
    + sigma' sqrt(1 - e^{-2h}) z, z from each sample's own generator.

    Coefficient row: c_x, the weights on (m0, m1[, m2]) and, for the SDE, the noise's.
    """

    def __init__(self, name: str, order: int, sde: bool = False):
        self.name, self.order, self.history, self.stochastic = name, order, order - 1, sde
        super().__init__()

    def _step_order(self, st: State) -> torch.Tensor:
        order = super()._step_order(st)
        if self.order > 2:
            second_last = (st["n"] < 15) & (st["i"] == st["n"] - 2)
            order = torch.where(second_last, order.clamp(max=2), order)
        return order

    def coefficients(self, ctx: State) -> torch.Tensor:
        eta0, eta1 = ctx["eta0"], ctx["eta1"]
        (a0, s0), (a1, s1) = _alpha_sigma(eta0), _alpha_sigma(eta1)
        lam0, lam1 = _lambda(eta0), _lambda(eta1)
        h = lam1 - lam0
        e = s1 * a0 / (a1 * s0)  # e^{-h}
        order = self._step_order(ctx)
        # q_k = h / h_k for the previous steps (h_0 = lam0 - lam_{-1}); 0 beside the infinite first step
        finite = torch.isfinite(h)
        h_safe = torch.where(finite, h, torch.ones_like(h))
        hk = torch.cat([lam0[:, None], ctx["lam"][:, :-1]], dim=1) - ctx["lam"]
        q = torch.where(finite[:, None] & (order[:, None] >= 2), h_safe[:, None] / hk, torch.zeros_like(hk))
        # weights on (m0, m1, m2) of D = D0 + c1 D1 + c2 D2 (the bracket the step multiplies)
        w = torch.zeros((len(h), 1 + self.history), dtype=torch.float64)
        w[:, 0] = 1.0
        if self.stochastic:
            c_x, c_d = s1 / s0 * e, a1 * (1 - e * e)
        else:
            c_x, c_d = s1 / s0, a1 * (1 - e)
        # D1_0 = q0 (m0 - m1)
        q0 = q[:, 0]
        if self.order == 2:
            c1 = 0.5 * torch.ones_like(h)
            c2 = torch.zeros_like(h)
            q1 = torch.zeros_like(h)
        else:
            q1 = torch.where(order >= 3, q[:, 1], torch.zeros_like(h))
            # third-order coefficients of D1 and D2 relative to alpha' (1 - e^{-h})
            one_m_e = torch.where(finite, 1 - e, torch.ones_like(e))
            c1 = torch.where(order >= 3, (1 - (1 - e) / h_safe) / one_m_e, 0.5 * torch.ones_like(h))
            c2 = torch.where(order >= 3, ((1 - e) / h_safe - 1 + 0.5 * h_safe) / h_safe / one_m_e, torch.zeros_like(h))
        # D1 = D1_0 + q1/(q0+q1) (D1_0 - D1_1), D2 = q0 q1/(q0+q1) (D1_0 - D1_1), D1_1 = q1 (m1 - m2)
        qs = q0 + q1
        both = qs != 0
        f1 = torch.where(both, q1 / torch.where(both, qs, torch.ones_like(qs)), torch.zeros_like(qs))
        f2 = torch.where(both, q0 * q1 / torch.where(both, qs, torch.ones_like(qs)), torch.zeros_like(qs))
        # D1_0 - D1_1 = q0 m0 - (q0 + q1) m1 + q1 m2
        d1 = [q0 * (1 + f1), -q0 - f1 * qs, f1 * q1]  # D1 on (m0, m1, m2)
        d2 = [f2 * q0, -f2 * qs, f2 * q1]  # D2 on (m0, m1, m2)
        for j in range(1 + self.history):
            w[:, j] += c1 * d1[j] + c2 * d2[j]
        cols = [c_x[:, None], c_d[:, None] * w]
        if self.stochastic:
            cols.append((s1 * (1 - e * e).clamp(min=0).sqrt())[:, None])
        return torch.cat(cols, dim=1)

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.stochastic and noise is None:
            raise ValueError(f"{self.name} is stochastic: advance() needs a noise tensor")
        coef = self._coefficients(st)
        m0, _ = self.inputs(st, x0_hat, eps_hat)
        m = torch.cat([m0[:, None], st["m"]], dim=1)
        x = _combine(st["x"], coef[:, 0], m, coef[:, 1 : 2 + self.history])
        if noise is not None and self.stochastic:
            x = x + _per_sample(coef[:, -1], x) * noise.to(x.dtype)
        st["x"] = x
        self._push(st, m0)
        return self._next_step(st)


def _unipc_b(h: torch.Tensor, order: int) -> list[torch.Tensor]:
    """UniPC's b vector for B(h) = e^h - 1 ("bh2", data prediction: hh = -h): b_k = k! phi_{k+1}(hh)
    / B(hh) with h phi_1 = e^hh - 1, from diffusers' multistep_uni_p_bh_update recursion. At
    h = inf every b_k is 1."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    out, factorial = [], 1
    for k in range(1, order + 1):
        out.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return out


class UniPC(Multistep):
    """UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"), data prediction, orders 2 and 3, as in
    diffusers' UniPCMultistepScheduler (with lower_order_final): a predictor (UniP) from the current
    point to the next, and a corrector (UniC) that, once the network has been evaluated at the
    predicted point, recomputes that point with this new x0 estimate as well; the next predictor
    starts from the corrected point. The evaluation is reused, so NFE = steps.

    Both have the form x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) [m0 + sum_k rho_k (m_k - m0) / r_k
    (+ rho_t (m_t - m0) in the corrector)], r_k = (lambda_k - lambda_0) / h for the earlier
    points, the rho from the b vector (a linear solve; diffusers' fixed 1/2 for the order-2
    predictor and the order-1 corrector). At the infinite first step the order-1 corrector's 1/2
    (the small-h limit of b_1) would average in the estimate at pure noise; it uses b_1 = 1 there,
    its limit at h = inf. Earlier points at pure noise (r = -inf) drop out as their limits do.

    State (besides Multistep's): x_last, the corrected point the last predictor started from.
    Coefficient row: the corrector's c_x and weights on (m..., m_t), then the predictor's c_x and
    weights on (m_t, m...); at the first step the corrector is the identity (nothing to correct).
    """

    def __init__(self, name: str, order: int):
        self.name, self.order, self.history = name, order, order
        super().__init__()

    def init(self, x_T, steps, schedule=None, etas=None, start=None, reverse=None) -> State:  # as Solver.init
        st = super().init(x_T, steps, schedule, etas, start, reverse)
        st["x_last"] = x_T.clone()
        return st

    def _step_order(self, st: State) -> torch.Tensor:
        # diffusers' lower_order_final for UniPC: order at most the number of steps left
        return torch.minimum(super()._step_order(st), st["n"] - st["i"])

    @staticmethod
    def _rhos(r: list[torch.Tensor], b: list[torch.Tensor], p: int, corrector: bool) -> list[torch.Tensor]:
        """Solve sum_k rho_k r_k^(j-1) = b_j (j = 1..p, r_t = 1 last in the corrector) per sample.
        r entries are finite here (infinite ones are masked by the caller)."""
        rs = r[: p - 1] + ([torch.ones_like(b[0])] if corrector else [])
        n = len(rs)
        if n == 0:
            return []
        mat = torch.stack([torch.stack([rk**j for rk in rs], dim=-1) for j in range(n)], dim=-2)  # (B, n, n)
        return list(torch.linalg.solve(mat, torch.stack(b[:n], dim=-1)).unbind(-1))

    def _update(
        self,
        lam_hist: torch.Tensor,
        lam0: torch.Tensor,
        eta0: torch.Tensor,
        eta1: torch.Tensor,
        order: torch.Tensor,
        corrector: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_x, weights) of one UniP step, weights on (m0, hist...), or UniC step, weights on
        (m0, hist..., m_t), from eta0 (lambda lam0, earlier lambdas lam_hist) to eta1."""
        (a0, s0), (a1, s1) = _alpha_sigma(eta0), _alpha_sigma(eta1)
        h = _lambda(eta1) - lam0
        finite = torch.isfinite(h)
        h_safe = torch.where(finite, h, torch.ones_like(h))
        e = s1 * a0 / (a1 * s0)
        b = [torch.where(finite, bk, torch.ones_like(bk)) for bk in _unipc_b(h_safe, self.order)]
        # r_k for the earlier points; where an earlier point is missing or at pure noise, a dummy
        # finite value (its weight is masked to 0 below, and the order drops with it)
        k_hist = lam_hist.shape[1]
        valid = [torch.isfinite(lam_hist[:, k]) & finite for k in range(k_hist)]
        r = [
            torch.where(valid[k], (lam_hist[:, k] - lam0) / h_safe, torch.full_like(h, -1.0 - k)) for k in range(k_hist)
        ]
        # the effective order: the points actually available (an infinite one ends the run)
        have = torch.zeros_like(order)
        run = torch.ones_like(finite)
        for k in range(k_hist):
            run = run & valid[k]
            have = have + run.long()
        eff = torch.minimum(order, have + 1)
        wm = torch.zeros((len(h), 1 + k_hist + 1), dtype=torch.float64)  # (m0, hist..., m_t)
        for p in range(1, self.order + 1):
            sel = eff == p
            if corrector:
                if p == 1:
                    rho = [torch.where(finite & (order == 1), 0.5 * torch.ones_like(h), b[0])]
                else:
                    rho = self._rhos(r, b, p, corrector=True)
            else:
                if p == 1:
                    rho = []
                elif p == 2:
                    rho = [0.5 * torch.ones_like(h)]
                else:
                    rho = self._rhos(r, b, p, corrector=False)
            w = torch.zeros_like(wm)
            w[:, 0] = 1.0
            for k in range(p - 1):  # earlier points: rho_k (m_k - m0) / r_k
                w[:, 1 + k] += rho[k] / r[k]
                w[:, 0] -= rho[k] / r[k]
            if corrector:
                w[:, -1] += rho[-1]
                w[:, 0] -= rho[-1]
            wm = torch.where(sel[:, None], w, wm)
        c_d = a1 * (1 - e)
        wm = wm if corrector else wm[:, :-1]
        return s1 / s0, c_d[:, None] * wm

    def coefficients(self, ctx: State) -> torch.Tensor:
        order = self._step_order(ctx)
        first = ctx["i"] == 0
        # UniC redoes the previous step (eta_prev -> eta0, from the point x_last) at that step's order;
        # a grid's steps are consecutive rows, so roll(1) is the previous step (masked at i = 0)
        p_last = torch.where(first, torch.ones_like(order), order.roll(1))
        lam = ctx["lam"]
        c_x, w = self._update(lam[:, 1:], lam[:, 0], ctx["eta_prev"], ctx["eta0"], p_last, corrector=True)
        c_x = torch.where(first, torch.ones_like(c_x), c_x)
        w = torch.where(first[:, None], torch.zeros_like(w), w)
        p_x, p_w = self._update(lam, _lambda(ctx["eta0"]), ctx["eta0"], ctx["eta1"], order, corrector=False)
        return torch.cat([c_x[:, None], w, p_x[:, None], p_w], dim=1)

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        m_t, _ = self.inputs(st, x0_hat, eps_hat)
        coef = self._coefficients(st)
        k = self.history + 2  # the corrector's columns: c_x, then m... and m_t
        # UniC: redo the step that led here, from x_last, with m_t as well; then UniP from there
        x = _combine(st["x_last"], coef[:, 0], torch.cat([st["m"], m_t[:, None]], dim=1), coef[:, 1:k])
        st["x"] = _combine(x, coef[:, k], torch.cat([m_t[:, None], st["m"]], dim=1), coef[:, k + 1 :])
        st["x_last"] = x
        self._push(st, m_t)
        return self._next_step(st)


_IMPLS: dict[str, Solver] = {
    s.name: s
    for s in (
        RungeKutta("euler", a=[[]], b=[1.0], c=[0.0]),
        RungeKutta("heun", a=[[], [1.0]], b=[0.5, 0.5], c=[0.0, 1.0]),
        RungeKutta(
            "rk4", a=[[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], b=[1 / 6, 1 / 3, 1 / 3, 1 / 6], c=[0.0, 0.5, 0.5, 1.0]
        ),
        DDIM(),
        DDPM(),
        DPMSolverPP("dpmpp2m", order=2),
        UniPC("unipc2", order=2),
        UniPC("unipc3", order=3),
        DPMSolverPP("dpmpp3m", order=3),
        DPMSolverPP("dpmpp2m_sde", order=2, sde=True),
    )
}

SOLVERS: tuple[str, ...] = solver_names.SOLVERS


def table_mismatches() -> list[str]:
    """Where solver_names.SOLVER_TABLE disagrees with the implementations here (empty: nowhere)."""
    if tuple(_IMPLS) != SOLVERS:
        return [f"names: table {SOLVERS}, implemented {tuple(_IMPLS)}"]
    return [
        f"{row.name}.{key}: table {getattr(row, key)!r}, implemented {getattr(_IMPLS[row.name], key)!r}"
        for row in solver_names.SOLVER_TABLE
        for key in ("nfe_per_step", "stochastic", "pair")
        if getattr(row, key) != getattr(_IMPLS[row.name], key)
    ]


if table_mismatches():
    raise RuntimeError("solver_names.SOLVER_TABLE is out of step with model.solvers: " + "; ".join(table_mismatches()))


def get_solver(name: str) -> Solver:
    try:
        return _IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(SOLVERS)}") from None


def nfe(solver: str, steps: int) -> int:
    """Network evaluations for `steps` steps of `solver` (one RK4 step costs 4)."""
    return get_solver(solver).nfe(steps)


Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like `like`: from one generator for the whole batch, or one
    generator per sample (so a sample's noise does not depend on its batch). Drawn on the
    generators' device and moved to `like`'s."""
    if generator is None:
        generator = torch.Generator(device=like.device)
        generator.seed()
    if isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
    return torch.stack(
        [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype) for g in generator]
    ).to(like.device)


@torch.no_grad()
def sample(
    denoiser: DenoiserFn,
    x_T: torch.Tensor,
    steps: int,
    solver: str | Solver,
    generator: Generators = None,
    callback: Callable[[int, State], None] | None = None,
    schedule: str | Sequence[str] | None = None,
    etas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from x_T at eta = pi/2 to eta = 0 in `steps` steps; returns x0.

    `denoiser(x, eta) -> (x0_hat, eps_hat)` with eta one value per sample. `generator` feeds the
    stochastic solvers (ddpm, dpmpp2m_sde): one generator, or one per sample. `schedule`: the time
    grid (solver_names.GRIDS; default uniform), one name or one per sample; `etas`: explicit points.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    impl = get_solver(solver) if isinstance(solver, str) else solver
    st = impl.init(x_T, torch.tensor(steps), schedule, etas)
    for k in range(impl.nfe(steps)):
        x, eta = impl.point(st)
        x0_hat, eps_hat = denoiser(x, eta)
        noise = draw_noise(st["x"], generator) if impl.stochastic else None
        impl.advance(st, x0_hat, eps_hat, noise)
        if callback is not None:
            callback(k, st)
    return st["x"]
