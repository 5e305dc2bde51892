"""The sampler vocabulary without torch: one table with a row per solver (its name, cost per
step, whether it draws noise, the time grid it gets by default and how it consumes the two
heads), the time grids and the measured defaults. The API's schema and /v1/models, the contract,
the CLI's choices and help and the playground (through /v1/models) all read it; model.solvers
checks its implementations against every row at import, and tests/model/test_solvers.py field by
field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Pair = Literal["predicted", "projected"]


@dataclass(frozen=True)
class SolverInfo:
    name: str
    nfe_per_step: int  # network evaluations per step (one RK4 step costs 4)
    stochastic: bool  # draws fresh noise every step (from the image's own generator)
    default_grid: str  # the time grid a request that names this solver and no grid gets
    # how the solver consumes (x0_hat, eps_hat), model.solvers.Solver.pair: "predicted", the heads
    # as the network gave them, through their velocity v_hat = -sin(eta) x0_hat + cos(eta) eps_hat;
    # "projected", schedule.consistent_pair (the pair on the constraint with the heads' velocity)
    pair: Pair
    summary: str  # a phrase for help texts

    def nfe(self, steps: int) -> int:
        return steps * self.nfe_per_step


# The binding six first, in their order, then the later additions. Uniform is the default grid of
# the solvers that came with it (the paper's), karras that of the later ones (measured at 10 NFE,
# docs/evaluation.md, "Defaults and why").
SOLVER_TABLE: tuple[SolverInfo, ...] = (
    SolverInfo("euler", 1, False, "uniform", "predicted", "Euler on the velocity"),
    SolverInfo("heun", 2, False, "uniform", "predicted", "Heun's second-order Runge-Kutta on the velocity"),
    SolverInfo("rk4", 4, False, "uniform", "predicted", "the paper's fourth-order Runge-Kutta, velocity form"),
    SolverInfo("ddim", 1, False, "uniform", "projected", "DDIM, the exact first-order exponential integrator"),
    SolverInfo("ddpm", 1, True, "uniform", "projected", "DDPM ancestral sampling (stochastic)"),
    SolverInfo("dpmpp2m", 1, False, "uniform", "projected", "DPM-Solver++(2M), second-order multistep"),
    SolverInfo("unipc2", 1, False, "karras", "projected", "UniPC, second order with its corrector"),
    SolverInfo("unipc3", 1, False, "karras", "projected", "UniPC, third order with its corrector"),
    SolverInfo("dpmpp3m", 1, False, "karras", "projected", "DPM-Solver++(3M), third-order multistep"),
    SolverInfo("dpmpp2m_sde", 1, True, "karras", "projected", "DPM-Solver++(2M) SDE (stochastic)"),
)
SOLVER_INFO: dict[str, SolverInfo] = {s.name: s for s in SOLVER_TABLE}
SOLVERS: tuple[str, ...] = tuple(SOLVER_INFO)

# time grids from eta = pi/2 to 0: uniform in eta (the paper's), uniform in lambda = log cot eta,
# Karras rho = 7 in sigma = tan eta
GRIDS: tuple[str, ...] = ("uniform", "logsnr", "karras")

# the measured default at 10 network evaluations (docs/evaluation.md, "Defaults and why")
DEFAULT_SOLVER = "dpmpp2m_sde"
DEFAULT_STEPS = 10
DEFAULT_SCHEDULE = SOLVER_INFO[DEFAULT_SOLVER].default_grid
DEFAULT_NFE = SOLVER_INFO[DEFAULT_SOLVER].nfe(DEFAULT_STEPS)
# below 8 steps the default's injected noise has too few steps left to be taken out again, and a
# deterministic solver does better (measured at 5 to 8 steps): a request that names only such a
# step count gets this one
FEW_STEPS_SOLVER = "unipc2"
FEW_STEPS_MAX = 7


def resolve(solver: str | None, steps: int | None, schedule: str | None) -> tuple[str, int, str]:
    """A request's (solver, steps, schedule) with the defaults filled in: no solver means the
    measured default sampler (FEW_STEPS_SOLVER for at most FEW_STEPS_MAX steps); no steps means
    about DEFAULT_NFE network evaluations of the solver; no schedule means the solver's default
    grid (SolverInfo.default_grid)."""
    if solver is None:
        solver = FEW_STEPS_SOLVER if steps is not None and steps <= FEW_STEPS_MAX else DEFAULT_SOLVER
    info = SOLVER_INFO.get(solver)
    if steps is None:
        per_step = info.nfe_per_step if info is not None else 1
        steps = DEFAULT_STEPS if solver == DEFAULT_SOLVER else max(1, round(DEFAULT_NFE / per_step))
    if schedule is None:
        schedule = info.default_grid if info is not None else DEFAULT_SCHEDULE
    return solver, steps, schedule


def nfe(solver: str, steps: int) -> int:
    """Network evaluations per image for `steps` steps of `solver`."""
    return SOLVER_INFO[solver].nfe(steps)


def nfe_by_solver() -> dict[str, int]:
    """solver name -> network evaluations per step (what /v1/models answers)."""
    return {s.name: s.nfe_per_step for s in SOLVER_TABLE}


def solvers_with_grid(grid: str) -> list[str]:
    """The solvers whose default grid is `grid` (for help texts)."""
    return [s.name for s in SOLVER_TABLE if s.default_grid == grid]


# ---- editing (issue 22): what an edit costs and which solvers can run the ODE backwards ----------

# Encoding integrates from eta = 0 up to pi/2. The one-step solvers' updates hold in either
# direction (ddim's is DDIM inversion); the multistep ones assume lambda = log cot eta rising from
# -inf and the stochastic ones are not invertible.
ENCODE_SOLVERS = ("ddim", "euler", "heun", "rk4")
# POST /v1/encodings' (and interpolations') default, measured on 32 MNIST test digits
# (docs/evaluation.md, "Editing"): heun's round trip is 0.45 grey levels RMS at 30 steps (60 NFE
# each way); ddim, the natural DDIM inversion, is first order and still 3 grey levels off at 100
DEFAULT_ENCODE_SOLVER = "heun"
DEFAULT_ENCODE_STEPS = 30


def edit_steps(steps: int, strength: float) -> int:
    """The steps an image-to-image edit runs: the last floor(strength * steps) (at least 1) of the
    `steps`-step grid, so it starts at that grid point (diffusers' img2img convention; on the
    uniform grid eta0 = (k / steps) pi/2 <= strength pi/2). The tolerance keeps 0.3 * 10 at 3."""
    return max(1, min(steps, math.floor(strength * steps + 1e-9)))
