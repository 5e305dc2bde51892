"""The forward process on a quarter circle, and the discrete schedules expressed on its angle.

x_eta = cos(eta) x0 + sin(eta) eps, eta in [0, pi/2]: eta = 0 is data, eta = pi/2 is pure noise.
In the usual VP notation alpha = cos(eta), sigma = sin(eta), alpha_bar = cos^2(eta), and the
half log-SNR used by DPM-Solver is lambda = log(alpha / sigma) = log(cot(eta)).

Every function here is a plain function over tensors. The one module-level value that changes is
_GRID_TABLE, grid_eta's cache of grid points per device: filled on first use and grown as larger
step counts come, it never changes a result (the same formula, read from a table).
"""

from __future__ import annotations

import math

import torch

ETA_MAX = math.pi / 2


def expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (B,) so it broadcasts against a batch x of shape (B, ...)."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def q_sample(x0: torch.Tensor, eps: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """x_eta = cos(eta) x0 + sin(eta) eps, with eta one value per sample."""
    c, s = expand_like(torch.cos(eta), x0), expand_like(torch.sin(eta), x0)
    return c * x0 + s * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """v = dx/deta = -sin(eta) x0 + cos(eta) eps: the ODE's right-hand side for given (x0, eps)."""
    c, s = expand_like(torch.cos(eta), x0), expand_like(torch.sin(eta), x0)
    return -s * x0 + c * eps


def log_snr_half(eta: torch.Tensor) -> torch.Tensor:
    """lambda = log(cot(eta)); -inf at eta = pi/2 and +inf at eta = 0 (DPM-Solver's time)."""
    return torch.log(torch.cos(eta)) - torch.log(torch.sin(eta))


def eta_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The angle of a VP schedule's alpha_bar: eta = arccos(sqrt(alpha_bar))."""
    return torch.arccos(torch.sqrt(alpha_bar.clamp(0.0, 1.0)))


def alpha_bar_from_eta(eta: torch.Tensor) -> torch.Tensor:
    return torch.cos(eta) ** 2


def betas_from_alpha_bar(alpha_bar: torch.Tensor, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} for t = 1..T (alpha_bar_0 = 1), clipped where it
    reaches 1 (the last angle step ends at alpha_bar = 0, which would make beta_T exactly 1)."""
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return (1.0 - alpha_bar / prev).clamp(max=max_beta)


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def angle_etas(T: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The discrete angle schedule: eta_t = (t / T)(pi / 2) for t = 0..T (T + 1 values)."""
    return torch.arange(T + 1, dtype=dtype) / T * ETA_MAX


def angle_alpha_bar(T: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """alpha_bar_t = cos^2(eta_t) for t = 1..T."""
    return alpha_bar_from_eta(angle_etas(T, dtype)[1:])


def angle_betas(T: int, max_beta: float = 0.999, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """beta_t = 1 - cos^2(eta_t) / cos^2(eta_{t-1}) for t = 1..T, clipped at max_beta."""
    return betas_from_alpha_bar(angle_alpha_bar(T, dtype), max_beta)


def linear_betas(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """DDPM's linear-beta VP schedule, beta_t for t = 1..T."""
    return torch.linspace(beta_start, beta_end, T, dtype=dtype)


def scaled_linear_betas(
    T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The 'scaled_linear' schedule (linear in sqrt(beta)) used by latent diffusion models."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=dtype) ** 2


def cosine_alpha_bar(T: int, s: float = 0.008, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (alpha_bar_t for t = 1..T, with beta capped at 0.999)."""
    t = torch.arange(T + 1, dtype=dtype) / T
    f = torch.cos((t + s) / (1 + s) * ETA_MAX) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return alpha_bar_from_betas(betas)


def linear_etas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The linear-beta schedule as an angle per discrete t = 1..T, so an eps model trained on it
    lives on the same eta axis as the angle schedule."""
    return eta_from_alpha_bar(alpha_bar_from_betas(linear_betas(T, beta_start, beta_end)))


def eta_to_timestep(eta: torch.Tensor, etas: torch.Tensor) -> torch.Tensor:
    """Fractional index into an increasing table of angles (etas[k] for timestep k), linear
    between entries and clamped to [0, len - 1]: how a discrete-time network is asked about an
    angle it never saw during training."""
    etas = etas.to(eta.device, torch.float64)
    e = eta.to(torch.float64).clamp(etas[0], etas[-1])
    hi = torch.searchsorted(etas, e).clamp(1, len(etas) - 1)
    lo = hi - 1
    w = (e - etas[lo]) / (etas[hi] - etas[lo]).clamp_min(1e-20)
    return (lo.to(torch.float64) + w).to(eta.dtype)


def uniform_eta_grid(steps: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The default sampling grid: steps + 1 angles from pi/2 down to 0, uniform in eta."""
    return torch.linspace(ETA_MAX, 0.0, steps + 1, dtype=dtype)


# The tuned grids run in sigma = tan(eta) from sigma_max down to sigma_min and add an explicit
# first step from pure noise (eta = pi/2) and a final step to the data (eta = 0): grid point 0 is
# pi/2, points 1..n-1 run from sigma_max to sigma_min, point n is 0. In lambda = log cot eta both
# end steps are infinitely long; the solvers take them with their first-order (exponential-
# integrator) step. The range and the Karras rho depend on the step count n, measured by FID on
# the bundled `mnist` (docs/evaluation.md, "Time grids"): few steps do best on a narrow range with
# points spread evenly (a large sigma_min hands the last stretch to the x0 estimate, a small
# sigma_max spends no step near pure noise). From 10 steps on sigma_max grows in proportion to n
# up to 40 steps, then like sqrt(n), and sigma_min shrinks like 1/n past 20: both first-order end
# steps keep shrinking, so every ODE solver converges to the ODE's solution. The first step's
# share of the angle (pi/2 - atan(sigma_max), about 1/sigma_max) has to shrink as fast as the
# others for the eps-only model, whose clipped x0 near pure noise makes that stretch the hardest
# (with sigma_max held fixed its solvers' error stalled: docs/evaluation.md, "Time grids"); on
# `mnist` the FID at 20 and 40 steps moved within the noise of the measurement.
TUNED_KNOTS: tuple[tuple[float, float, float, float], ...] = (
    # steps, sigma_max, sigma_min, rho; log-log interpolation between knots, constant below the first
    (5, 8.0, 0.2, 1.5),
    (10, 20.0, 0.15, 5.0),
    (20, 40.0, 0.05, 7.0),
    (40, 80.0, 0.02, 7.0),
    (4000, 800.0, 0.0002, 7.0),  # the sqrt(n) and 1/n tails
)
GRID_IDS = {"uniform": 0, "logsnr": 1, "karras": 2}  # the per-sample grid id held in a solver state


def eta_from_log_snr_half(lam: torch.Tensor) -> torch.Tensor:
    """The inverse of log_snr_half: eta = arctan(exp(-lambda))."""
    return torch.atan(torch.exp(-lam))


def eta_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """The angle of a VE noise level sigma = tan(eta) (x / cos(eta) = x0 + sigma eps)."""
    return torch.atan(sigma)


def tuned_range(steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma_max, sigma_min, rho) of the tuned grids for per-sample step counts (float64, the
    shape of `steps`): TUNED_KNOTS interpolated linearly in (log steps, log value), clamped at the
    end knots. Off the sampling path: grid_eta reads its table."""
    knots = torch.tensor(TUNED_KNOTS, dtype=torch.float64, device=steps.device).log()
    log_n = steps.reshape(-1).to(torch.float64).clamp(knots[0, 0].exp(), knots[-1, 0].exp()).log()
    hi = torch.searchsorted(knots[:, 0].contiguous(), log_n).clamp(1, len(knots) - 1)
    w = ((log_n - knots[hi - 1, 0]) / (knots[hi, 0] - knots[hi - 1, 0]))[:, None]
    values = (knots[hi - 1, 1:] + w * (knots[hi, 1:] - knots[hi - 1, 1:])).exp()
    return tuple(values[:, k].reshape(steps.shape) for k in range(3))  # type: ignore[return-value]


def tuned_eta(
    t: torch.Tensor,
    grid: torch.Tensor,
    sigma_max: torch.Tensor | float,
    sigma_min: torch.Tensor | float,
    rho: torch.Tensor | float,
) -> torch.Tensor:
    """eta at fraction t in [0, 1] of a tuned grid's interior, from sigma_max (t = 0) to sigma_min
    (t = 1): logsnr is uniform in lambda = -log sigma, karras uniform in sigma^(1/rho)."""
    sigma_max, sigma_min, rho = (torch.as_tensor(v, dtype=torch.float64) for v in (sigma_max, sigma_min, rho))
    lam_lo, lam_hi = -torch.log(sigma_max), -torch.log(sigma_min)
    logsnr = eta_from_log_snr_half(lam_lo + t * (lam_hi - lam_lo))
    r_max, r_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    karras = eta_from_sigma((r_max + t * (r_min - r_max)) ** rho)
    return torch.where(grid == GRID_IDS["logsnr"], logsnr, karras)


def _grid_eta_formula(i: torch.Tensor, steps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """grid_eta computed from its definition (float64), for building the tables below."""
    i64, n64 = i.to(torch.float64), steps.to(torch.float64)
    uniform = ETA_MAX * (1.0 - i64 / n64)
    t = torch.where(n64 > 2, (i64 - 1) / (n64 - 2).clamp_min(1.0), torch.full_like(i64, 0.5)).clamp(0.0, 1.0)
    tuned = tuned_eta(t, grid, *tuned_range(steps))
    tuned = torch.where(
        i <= 0, torch.full_like(tuned, ETA_MAX), torch.where(i >= steps, torch.zeros_like(tuned), tuned)
    )
    return torch.where(grid == GRID_IDS["uniform"], uniform, tuned)


# grid_eta runs at every step of every sample group (a few dozen small tensor ops each time): the
# engine reads it from a table of every (grid, steps, i) up to the largest step count seen so far,
# grown in powers of two (1024 steps: 25 MB); one table per device. On an accelerator it is built
# once for GRID_TABLE_GPU_STEPS (the API takes at most 1000 steps)
GRID_TABLE_GPU_STEPS = 1023
_GRID_TABLE: dict[torch.device, torch.Tensor] = {}


def _grid_table(max_steps: int, device: torch.device) -> torch.Tensor:
    table = _GRID_TABLE.get(device)
    if table is None or table.shape[1] <= max_steps:
        size = 1 << max(5, max_steps.bit_length())  # steps 0..size-1
        g, n, i = torch.meshgrid(
            torch.arange(len(GRID_IDS)), torch.arange(size).clamp_min(1), torch.arange(size), indexing="ij"
        )
        table = _GRID_TABLE[device] = _grid_eta_formula(i.minimum(n), n, g).to(device)
    return table


def grid_eta(i: torch.Tensor, steps: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
    """eta at index i of a grid with `steps` steps, for per-sample (i, steps, grid id) vectors
    (grid None: all uniform). Float64; one lookup in a table of every grid (built on first use).

    uniform: eta = (pi/2)(1 - i/n), the paper's grid. logsnr and karras: tuned_eta over
    tuned_range(n). The tuned grids' interior points are i = 1..n-1 (fraction t = (i-1)/(n-2); a
    single interior point sits at t = 1/2). Indices past the end read eta = 0."""
    # on a GPU no device sync at every step: the table for every step count the API takes, once
    need = (int(steps.max()) if steps.numel() else 1) if steps.device.type == "cpu" else GRID_TABLE_GPU_STEPS
    table = _grid_table(need, steps.device)
    g = torch.zeros_like(steps) if grid is None else grid
    n = steps.long().clamp_min(1)
    return table[g.long(), n, i.long().clamp(0).minimum(n)]


def grid_etas(steps: int, grid: str | int = "uniform") -> torch.Tensor:
    """The whole grid (steps + 1 angles, float64) of one grid, by name or GRID_IDS id."""
    i = torch.arange(steps + 1)
    return grid_eta(i, torch.full_like(i, steps), torch.full_like(i, GRID_IDS[grid] if isinstance(grid, str) else grid))


def consistent_pair(
    x: torch.Tensor, x0_hat: torch.Tensor, eps_hat: torch.Tensor, eta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads' estimates projected onto x = cos(eta) x0 + sin(eta) eps, keeping their velocity:
    x0 = cos x - sin v_hat, eps = sin x + cos v_hat (v_hat = velocity(x0_hat, eps_hat, eta)). The
    same as moving both heads along the constraint by r = x - cos x0_hat - sin eps_hat:
    x0 = x0_hat + cos r, eps = eps_hat + sin r. Near eta = 0 this takes x0 mostly from x, near
    pi/2 eps mostly from x: the better-determined side at each end."""
    v_hat = velocity(x0_hat, eps_hat, eta)
    c, s = expand_like(torch.cos(eta), x), expand_like(torch.sin(eta), x)
    return c * x - s * v_hat, s * x + c * v_hat
