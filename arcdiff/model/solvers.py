"""Samplers that integrate from eta = pi/2 (noise) to eta = 0 (data) on a uniform eta grid.

Every solver is written as a per-sample state machine advanced one network evaluation at a time:

    state = solver.init(x_T, steps)               # per-sample tensors, leading batch dim
    x, eta = solver.point(state)                 # where each sample wants its next evaluation
    x0_hat, eps_hat = denoiser(x, eta)
    done = solver.advance(state, x0_hat, eps_hat, noise)

Samples in one state may be at different steps, stages and grid sizes, so a worker can run many
requests in one batch and let samples join and leave at every evaluation. A state is a plain
dict of tensors (concatenate to join, index to leave); the solver objects hold no state, so any
number of requests can share them. `sample()` is the thin loop over this for one batch.

Which form of the update each solver uses matters for a dual-head model, whose x is not exactly
cos(eta) x0_hat + sin(eta) eps_hat:
- euler, heun, rk4: velocity form, v_hat = -sin(eta) x0_hat + cos(eta) eps_hat (equation 13).
- ddim: x0+eps form, x_next = cos(eta_next) x0_hat + sin(eta_next) eps_hat.
- ddpm: ancestral DDIM with full noise (DDIM's eta = 1), in the x0+eps form: x_next =
  cos(eta_next) x0_hat + sqrt(sin^2(eta_next) - var) eps_hat + sqrt(var) z, with var the DDPM
  posterior variance between the two grid points.
- dpmpp2m: data-prediction form (x0_hat only, and x through the exponential integrator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from arcdiff.model.denoiser import DenoiserFn
from arcdiff.model.schedule import ETA_MAX, expand_like, grid_eta

State = dict[str, torch.Tensor]


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 per-sample coefficient, cast to x's dtype and shaped to broadcast against it."""
    return expand_like(v.to(x.dtype), x)


class Solver:
    """Base for the solvers: a name, its network evaluations per step, and the state machine."""

    name: str = ""
    nfe_per_step: int = 1
    stochastic: bool = False

    def nfe(self, steps: int) -> int:
        return steps * self.nfe_per_step

    def init(self, x_T: torch.Tensor, steps: torch.Tensor) -> State:
        """A state for samples starting at x_T; `steps` is one step count per sample."""
        b = x_T.shape[0]
        i = torch.zeros(b, dtype=torch.long, device=x_T.device)
        n = steps.to(device=x_T.device, dtype=torch.long).expand(b).clone()
        eta0 = grid_eta(i, n)
        # the current step's ends (and the previous step's start) are kept in the state rather than
        # recomputed from (i, n) at every call: fewer small ops per evaluation, same values
        return {"x": x_T.clone(), "i": i, "n": n, "eta_prev": eta0, "eta0": eta0, "eta1": grid_eta(i + 1, n)}

    def _etas(self, st: State) -> tuple[torch.Tensor, torch.Tensor]:
        """(eta_i, eta_{i+1}) in float64 for every sample's current step."""
        return st["eta0"], st["eta1"]

    @staticmethod
    def _next_step(st: State, stepped: torch.Tensor | None = None) -> torch.Tensor:
        """Move the samples in `stepped` (all if None) to their next step; returns the finished mask."""
        if stepped is None:
            st["i"] = st["i"] + 1
            st["eta_prev"], st["eta0"] = st["eta0"], st["eta1"]
            st["eta1"] = grid_eta(st["i"] + 1, st["n"])
        else:
            st["i"] = st["i"] + stepped.long()
            st["eta_prev"] = torch.where(stepped, st["eta0"], st["eta_prev"])
            st["eta0"] = torch.where(stepped, st["eta1"], st["eta0"])
            st["eta1"] = torch.where(stepped, grid_eta(st["i"] + 1, st["n"]), st["eta1"])
        return st["i"] >= st["n"]

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

    def init(self, x_T: torch.Tensor, steps: torch.Tensor) -> State:
        st = super().init(x_T, steps)
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
        c, s = expand_like(torch.cos(eta), x0_hat), expand_like(torch.sin(eta), x0_hat)
        v_hat = (-s * x0_hat + c * eps_hat).to(st["x"].dtype)
        st["k"][torch.arange(len(stage), device=stage.device), stage] = v_hat
        complete = stage + 1 == self.nfe_per_step
        x_next = self._combine(st, b.expand(len(stage), -1), h)
        st["x"] = torch.where(expand_like(complete, x_next), x_next, st["x"])
        st["stage"] = torch.where(complete, torch.zeros_like(stage), stage + 1)
        return self._next_step(st, complete)


class DDIM(Solver):
    """x_next = cos(eta_next) x0_hat + sin(eta_next) eps_hat: exact for a constant (x0, eps)."""

    name = "ddim"

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        _, eta1 = self._etas(st)
        x = st["x"]
        st["x"] = _per_sample(torch.cos(eta1), x) * x0_hat.to(x.dtype) + _per_sample(torch.sin(eta1), x) * eps_hat.to(
            x.dtype
        )
        return self._next_step(st)


class DDPM(Solver):
    """Ancestral sampling with the DDPM posterior variance between consecutive grid points.

    With alpha_bar = cos^2(eta) the step from eta to eta' has beta = 1 - cos^2(eta)/cos^2(eta') and
    posterior variance var = sin^2(eta')/sin^2(eta) * beta. At eta = pi/2 this gives var =
    sin^2(eta') (x_next = cos x0_hat + sin z), at eta' = 0 var = 0 (x_next = x0_hat).
    The noise z comes from each sample's own generator (the caller passes it in).
    """

    name = "ddpm"
    stochastic = True

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        if noise is None:
            raise ValueError("ddpm is stochastic: advance() needs a noise tensor")
        eta0, eta1 = self._etas(st)
        s0, c1, s1 = torch.sin(eta0), torch.cos(eta1), torch.sin(eta1)
        beta = 1.0 - torch.cos(eta0) ** 2 / c1**2
        var = (s1**2 / s0**2 * beta).clamp(min=0.0)
        x = st["x"]
        st["x"] = (
            _per_sample(c1, x) * x0_hat.to(x.dtype)
            + _per_sample((s1**2 - var).clamp(min=0.0).sqrt(), x) * eps_hat.to(x.dtype)
            + _per_sample(var.sqrt(), x) * noise.to(x.dtype)
        )
        return self._next_step(st)


def _lambda(eta: torch.Tensor) -> torch.Tensor:
    """lambda = log(cot eta) in float64, exactly -inf at pi/2 and +inf at 0 (float cos(pi/2) is
    6e-17, not 0, which would make the first step merely very long instead of infinite)."""
    lam = torch.log(torch.cos(eta)) - torch.log(torch.sin(eta))
    lam = torch.where(eta >= ETA_MAX, torch.full_like(lam, -math.inf), lam)
    return torch.where(eta <= 0, torch.full_like(lam, math.inf), lam)


class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022) in lambda = log(cot eta), data-prediction form.

    x' = (sin eta' / sin eta) x + cos(eta') (1 - e^{-h}) D, h = lambda' - lambda,
    D = x0_hat + (h / (2 h_prev)) (x0_hat - x0_prev) for the second-order steps.
    Both ends of the grid are infinite steps in lambda. The first step (h = inf) has no previous
    estimate and is first order; on the second, h_prev = inf makes the correction vanish; the last
    step (to eta = 0, h = inf) is taken first order, which returns x0_hat (as DPM-Solver's
    "lower order final" does). e^{-h} is computed as tan(eta')/tan(eta), finite at both ends.
    """

    name = "dpmpp2m"

    def init(self, x_T: torch.Tensor, steps: torch.Tensor) -> State:
        st = super().init(x_T, steps)
        st["x0_prev"] = torch.zeros_like(x_T)
        return st

    def advance(
        self, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        eta0, eta1 = self._etas(st)
        eta_prev = st["eta_prev"]  # eta_{i-1}; eta_0 itself on the first step
        x = st["x"]
        x0_hat = x0_hat.to(x.dtype)
        sigma_ratio = torch.sin(eta1) / torch.sin(eta0)
        exp_neg_h = torch.sin(eta1) * torch.cos(eta0) / (torch.cos(eta1) * torch.sin(eta0))
        h = _lambda(eta1) - _lambda(eta0)
        h_prev = _lambda(eta0) - _lambda(eta_prev)
        second = (st["i"] > 0) & (eta1 > 0)
        w = torch.where(second, h / torch.where(second, 2 * h_prev, torch.ones_like(h_prev)), torch.zeros_like(h))
        w = torch.nan_to_num(w, nan=0.0, posinf=0.0)  # h_prev = inf: the correction vanishes
        d = x0_hat + _per_sample(w, x) * (x0_hat - st["x0_prev"])
        st["x"] = _per_sample(sigma_ratio, x) * x + _per_sample(torch.cos(eta1) * (1 - exp_neg_h), x) * d
        st["x0_prev"] = x0_hat
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
        DPMSolverPP2M(),
    )
}

SOLVERS: tuple[str, ...] = tuple(_IMPLS)


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
    solver: str,
    generator: Generators = None,
    callback: Callable[[int, State], None] | None = None,
) -> torch.Tensor:
    """Integrate from x_T at eta = pi/2 to eta = 0 in `steps` steps; returns x0.

    `denoiser(x, eta) -> (x0_hat, eps_hat)` with eta one value per sample. `generator` feeds the
    stochastic solver (ddpm): one generator, or one per sample.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    impl = get_solver(solver)
    st = impl.init(x_T, torch.tensor(steps))
    for k in range(impl.nfe(steps)):
        x, eta = impl.point(st)
        x0_hat, eps_hat = denoiser(x, eta)
        noise = draw_noise(st["x"], generator) if impl.stochastic else None
        impl.advance(st, x0_hat, eps_hat, noise)
        if callback is not None:
            callback(k, st)
    return st["x"]
