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
DEFAULT_SOLVER = "unipc2"
DEFAULT_STEPS = 10
DEFAULT_SCHEDULE = "karras"
