"""Editing with the angle ODE: image-to-image, inpainting, encoding and interpolation, as plain
functions over tensors and over the solvers' per-sample state (arcdiff/model/solvers.py).

- Image-to-image (SDEdit on the quarter circle): the input x0_in is noised to
  x = cos(eta0) x0_in + sin(eta0) eps and the solver runs the tail of its grid from there.
  `strength` picks the tail: the last solver_names.edit_steps(steps, strength) =
  floor(strength * steps) steps of the `steps`-step grid, so eta0 is a grid point (on the uniform
  grid eta0 = (k / steps) pi/2, strength rounded down to a multiple of 1/steps) and the edit costs
  nfe(solver, k) evaluations, not nfe(solver, steps). Strength 1 is a generation from noise.
- Inpainting: at every evaluation the known pixels go back into the x0 head's estimate,
  x0 = m x0_hat + (1 - m) x0_known (m = 1: regenerate), and eps is re-formed from x so that the
  pair stays on x = cos(eta) x0 + sin(eta) eps (`inpaint_pair`): no extra evaluation. The image
  that leaves the batch is composited once more, so the known pixels come back exactly.
- Encoding: the ODE integrated from eta = 0 up to pi/2 (the grid read backwards) returns the noise
  latent that decodes to the image; ddim there is DDIM inversion. Only the one-step deterministic
  solvers run backwards (solver_names.ENCODE_SOLVERS).
- Interpolation: slerp between two latents (seeds' noise, given noise, or encodings), decoded.

The engine (arcdiff/worker/batch.py) runs the same state machine with these per-sample inputs:
the functions here that run one batch (`edit`, `encode`, `decode`) are the reference it is
tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from arcdiff.model.denoiser import DenoiserFn
from arcdiff.model.schedule import consistent_pair, expand_like, grid_etas, q_sample
from arcdiff.model.solver_names import ENCODE_SOLVERS, edit_steps
from arcdiff.model.solvers import Generators, Solver, State, draw_noise, get_solver

# the solver state's editing entries; a state holds them only for rows that need them, and rows
# without them join a state that has them with these neutral values (mask 1: regenerate all)
EDIT_KEYS = ("mask", "x0_known")


def start_index(steps: int, strength: float) -> int:
    """The grid index an image-to-image edit of `strength` starts at (the steps it skips)."""
    return steps - edit_steps(steps, strength)


def start_eta(steps: int, strength: float, schedule: str = "uniform") -> float:
    """eta0, the angle an edit starts at: the grid point at start_index."""
    return float(grid_etas(steps, schedule)[start_index(steps, strength)])


def noised(x0_in: torch.Tensor, eps: torch.Tensor, eta0: torch.Tensor | float) -> torch.Tensor:
    """x_start = cos(eta0) x0_in + sin(eta0) eps, eta0 one value per sample (or one for all)."""
    eta = torch.as_tensor(eta0, dtype=torch.float64).expand(x0_in.shape[0])
    return q_sample(x0_in, eps, eta.to(x0_in.dtype))


def inpaint_pair(
    x: torch.Tensor,
    eta: torch.Tensor,
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    mask: torch.Tensor,
    x0_known: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads' estimates at (x, eta) with the known pixels put back into x0 (mask 1 =
    regenerate, 0 = keep x0_known): the consistent pair first (schedule.consistent_pair), then
    x0 = m x0 + (1 - m) x0_known and eps = (x - cos(eta) x0) / sin(eta), which moves eps by
    -cot(eta) (1 - m)(x0_known - x0). The result is on the constraint, so every solver (velocity or
    x0/eps form) sees the same correction. At eta = 0 (the last stage of heun and rk4, the first
    evaluation of an encoding) sin is 0 and eps is left as projected: x0 does not enter the
    velocity there."""
    x0_p, eps_p = consistent_pair(x, x0_hat.to(x.dtype), eps_hat.to(x.dtype), eta.to(x.dtype))
    keep = (1 - mask) * (x0_known - x0_p)
    s = torch.sin(eta.to(torch.float64))
    cot = torch.where(s > 0, torch.cos(eta.to(torch.float64)) / s.clamp_min(1e-300), torch.zeros_like(s))
    return x0_p + keep, eps_p - expand_like(cot.to(x.dtype), x) * keep


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation between two latents (per sample, over all but the batch dim): the
    path a Gaussian latent's norm keeps (a straight line would pass through low-norm latents the
    model never saw). t one value, or one per sample; falls back to a straight line when the two
    are (nearly) parallel."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device).expand(a.shape[0])[:, None]
    cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True)).clamp_min(1e-30)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    so = torch.sin(omega)
    parallel = so < 1e-6
    w0 = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / torch.where(parallel, torch.ones_like(so), so))
    w1 = torch.where(parallel, t, torch.sin(t * omega) / torch.where(parallel, torch.ones_like(so), so))
    return (w0 * a + w1 * b).reshape(z0.shape).to(z0.dtype)


def frames(k: int) -> list[float]:
    """The k interpolation fractions 0, 1/(k-1), ..., 1."""
    if k < 2:
        raise ValueError(f"an interpolation needs at least 2 frames, got {k}")
    return [j / (k - 1) for j in range(k)]


def advance(
    impl: Solver, st: State, x0_hat: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Solver.advance with the state's inpainting mask applied to this evaluation's estimates (a
    state without a mask: unchanged). The evaluation point is the solver's own point(), the one the
    network was asked about."""
    if "mask" in st:
        x, eta = impl.point(st)
        x0_hat, eps_hat = inpaint_pair(x, eta, x0_hat, eps_hat, st["mask"], st["x0_known"])
    return impl.advance(st, x0_hat, eps_hat, noise)


def composite(st: State, x: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
    """A finished x with its known pixels put back exactly (a state without a mask: x itself)."""
    if "mask" not in st:
        return x
    sel = slice(None) if rows is None else rows
    m = st["mask"][sel]
    return m * x + (1 - m) * st["x0_known"][sel]


def neutral(key: str, like: torch.Tensor) -> torch.Tensor:
    """The neutral value of an editing entry for rows shaped like `like` (B, C, H, W): no mask."""
    if key == "mask":
        return torch.ones_like(like)
    if key == "x0_known":
        return torch.zeros_like(like)
    raise KeyError(key)


def check_encode_solver(solver: str) -> None:
    if solver not in ENCODE_SOLVERS:
        raise ValueError(
            f"solver {solver!r} cannot encode (run the ODE towards noise); use one of {', '.join(ENCODE_SOLVERS)}"
        )


@torch.no_grad()
def _run(impl: Solver, st: State, denoiser: DenoiserFn, nfe: int, generator: Generators) -> torch.Tensor:
    for _ in range(nfe):
        x, eta = impl.point(st)
        x0_hat, eps_hat = denoiser(x, eta)
        noise = draw_noise(st["x"], generator) if impl.stochastic else None
        advance(impl, st, x0_hat, eps_hat, noise)
    return composite(st, st["x"])


def edit(
    denoiser: DenoiserFn,
    x0_in: torch.Tensor,
    eps: torch.Tensor,
    steps: int,
    solver: str,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    schedule: str = "uniform",
    generator: Generators = None,
) -> torch.Tensor:
    """Image-to-image (and, with `mask`, inpainting) of a batch x0_in (in the model's data range),
    eps the start noise: the last edit_steps(steps, strength) steps of the grid from the noised
    input. mask (same shape, or broadcastable): 1 regenerate, 0 keep."""
    impl = get_solver(solver)
    s0 = start_index(steps, strength)
    eta0 = float(grid_etas(steps, schedule)[s0])
    b = x0_in.shape[0]
    st = impl.init(
        noised(x0_in, eps, eta0), torch.tensor(steps), schedule, start=torch.full((b,), s0, dtype=torch.long)
    )
    if mask is not None:
        st["mask"] = mask.to(x0_in.dtype).expand_as(x0_in).clone()
        st["x0_known"] = x0_in.clone()
    return _run(impl, st, denoiser, impl.nfe(steps - s0), generator)


def encode(
    denoiser: DenoiserFn, x0: torch.Tensor, steps: int, solver: str = "ddim", schedule: str = "uniform"
) -> torch.Tensor:
    """The noise latent of a batch of images: the ODE from eta = 0 up to pi/2 in `steps` steps."""
    check_encode_solver(solver)
    impl = get_solver(solver)
    b = x0.shape[0]
    st = impl.init(x0, torch.tensor(steps), schedule, reverse=torch.ones(b, dtype=torch.bool))
    return _run(impl, st, denoiser, impl.nfe(steps), None)


def decode(
    denoiser: DenoiserFn, z: torch.Tensor, steps: int, solver: str = "ddim", schedule: str = "uniform"
) -> torch.Tensor:
    """Latents back to images: the ODE from pi/2 down to 0 (solvers.sample, deterministic)."""
    impl = get_solver(solver)
    st = impl.init(z, torch.tensor(steps), schedule)
    return _run(impl, st, denoiser, impl.nfe(steps), None)


def interpolate(
    denoiser: DenoiserFn,
    z0: torch.Tensor,
    z1: torch.Tensor,
    k: int,
    steps: int,
    solver: str = "ddim",
    schedule: str = "uniform",
) -> torch.Tensor:
    """k images decoded from slerp(z0, z1, t), t = 0 .. 1 (z0, z1 single latents (C, H, W))."""
    ts = torch.tensor(frames(k), dtype=torch.float64)
    z = slerp(z0.expand(k, *z0.shape).contiguous(), z1.expand(k, *z1.shape).contiguous(), ts)
    return decode(denoiser, z, steps, solver, schedule)


def rms_grey(a: torch.Tensor, b: torch.Tensor, data_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """Per-image RMS difference in grey levels (0-255) of two batches in the data range."""
    scale = 255.0 / (float(data_range[1]) - float(data_range[0]))
    return ((a.double() - b.double()) * scale).flatten(1).pow(2).mean(1).sqrt()


__all__ = [
    "EDIT_KEYS",
    "advance",
    "composite",
    "decode",
    "edit",
    "encode",
    "frames",
    "inpaint_pair",
    "interpolate",
    "neutral",
    "noised",
    "rms_grey",
    "slerp",
    "start_eta",
    "start_index",
]
