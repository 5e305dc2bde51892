"""The sampler vocabulary without torch: solver names, their cost per step, the time grids and
the defaults, for the API contract, the CLI and the playground (model.solvers re-exports them and
checks them against its implementations)."""

from __future__ import annotations

# name -> network evaluations per step (one RK4 step costs 4)
NFE_PER_STEP: dict[str, int] = {
    "euler": 1,
    "heun": 2,
    "rk4": 4,
    "ddim": 1,
    "ddpm": 1,
    "dpmpp2m": 1,
    "unipc2": 1,
    "unipc3": 1,
    "dpmpp3m": 1,
    "dpmpp2m_sde": 1,
}
SOLVERS: tuple[str, ...] = tuple(NFE_PER_STEP)
STOCHASTIC: frozenset[str] = frozenset({"ddpm", "dpmpp2m_sde"})

# time grids from eta = pi/2 to 0: uniform in eta (the paper's), uniform in lambda = log cot eta,
# Karras rho = 7 in sigma = tan eta
GRIDS: tuple[str, ...] = ("uniform", "logsnr", "karras")

# the measured default at 10 network evaluations (docs/evaluation.md, "Defaults and why")
DEFAULT_SOLVER = "dpmpp2m_sde"
DEFAULT_STEPS = 10
DEFAULT_SCHEDULE = "karras"
DEFAULT_NFE = DEFAULT_STEPS * NFE_PER_STEP[DEFAULT_SOLVER]
# below 8 steps the default's injected noise has too few steps left to be taken out again, and a
# deterministic solver does better (measured at 5 to 8 steps): a request that names only such a
# step count gets this one
FEW_STEPS_SOLVER = "unipc2"
FEW_STEPS_MAX = 7
# the solvers that came with the uniform grid keep it when a request names them without a grid
UNIFORM_BY_DEFAULT: frozenset[str] = frozenset({"euler", "heun", "rk4", "ddim", "ddpm", "dpmpp2m"})


def resolve(solver: str | None, steps: int | None, schedule: str | None) -> tuple[str, int, str]:
    """A request's (solver, steps, schedule) with the defaults filled in: no solver means the
    measured default sampler (FEW_STEPS_SOLVER for at most FEW_STEPS_MAX steps); no steps means
    about DEFAULT_NFE network evaluations of the solver; no schedule means uniform for the solvers
    that had only that grid, karras for the others."""
    if solver is None:
        solver = FEW_STEPS_SOLVER if steps is not None and steps <= FEW_STEPS_MAX else DEFAULT_SOLVER
    if steps is None:
        steps = DEFAULT_STEPS if solver == DEFAULT_SOLVER else max(1, round(DEFAULT_NFE / NFE_PER_STEP.get(solver, 1)))
    if schedule is None:
        schedule = "uniform" if solver in UNIFORM_BY_DEFAULT else DEFAULT_SCHEDULE
    return solver, steps, schedule


def nfe(solver: str, steps: int) -> int:
    """Network evaluations per image for `steps` steps of `solver`."""
    return steps * NFE_PER_STEP[solver]
