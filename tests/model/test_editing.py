"""Editing math (arcdiff/model/editing.py): image-to-image start, inpainting pair, encoding,
slerp; on the exact Gaussian-mixture denoiser where the ODE's answer is known."""

import math

import pytest
import torch
from gmm import default_mixture

from arcdiff.model import editing
from arcdiff.model.schedule import grid_etas
from arcdiff.model.solver_names import ENCODE_SOLVERS, edit_steps
from arcdiff.model.solvers import SOLVERS, get_solver, sample


def test_edit_steps_is_the_floor_of_strength_times_steps():
    assert edit_steps(10, 0.3) == 3  # 0.3 * 10 is 2.9999999999999996 in floats
    assert edit_steps(10, 1.0) == 10
    assert edit_steps(10, 0.01) == 1  # at least one step
    assert edit_steps(7, 0.5) == 3
    assert editing.start_eta(10, 0.3) == pytest.approx(0.3 * math.pi / 2)
    assert editing.start_eta(8, 0.3) == pytest.approx(2 / 8 * math.pi / 2)  # rounded down to the grid


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp2m", "unipc3", "dpmpp3m"])
@pytest.mark.parametrize("schedule", ["uniform", "karras"])
def test_an_edit_is_the_tail_of_the_grid(solver, schedule):
    """Starting at grid index s (tables keyed by the start for the multistep solvers) is the same
    as sampling on the explicit tail of the grid: no history from before the start."""
    gm = default_mixture()
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(3, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    steps, strength = 12, 0.55
    got = editing.edit(gm.denoiser, x0, eps, steps, solver, strength, schedule=schedule)
    s0 = editing.start_index(steps, strength)
    tail = grid_etas(steps, schedule)[s0:]
    x_start = editing.noised(x0, eps, float(tail[0]))
    want = sample(gm.denoiser, x_start, len(tail) - 1, solver, etas=tail[None].expand(3, -1))
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()


def test_low_strength_keeps_the_image_close():
    gm = default_mixture()
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(64, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    dist = [(editing.edit(gm.denoiser, x0, eps, 20, "heun", s) - x0).norm(dim=1).mean() for s in (0.1, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2]
    assert dist[0] < 0.3 * dist[2]


def test_inpaint_pair_is_consistent_and_keeps_the_known_pixels():
    g = torch.Generator().manual_seed(2)
    x, x0_hat, eps_hat, known = (torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    mask = (torch.rand(4, 1, 4, 4, generator=g) > 0.5).double()
    eta = torch.tensor([0.3, 0.8, 1.2, math.pi / 2], dtype=torch.float64)
    x0, eps = editing.inpaint_pair(x, eta, x0_hat, eps_hat, mask, known)
    c, s = torch.cos(eta)[:, None, None, None], torch.sin(eta)[:, None, None, None]
    assert torch.allclose(c * x0 + s * eps, x, atol=1e-12)  # on the constraint
    assert torch.allclose(x0 * (1 - mask), known * (1 - mask))  # known pixels in x0
    # where m = 1 it is the plain projected pair
    from arcdiff.model.schedule import consistent_pair

    x0_p, eps_p = consistent_pair(x, x0_hat, eps_hat, eta)
    assert torch.allclose(x0 * mask, x0_p * mask) and torch.allclose(eps * mask, eps_p * mask)


@pytest.mark.parametrize("solver", ["ddim", "heun", "rk4", "dpmpp2m", "ddpm"])
def test_inpainting_keeps_the_known_half_and_fills_the_other(solver):
    """The known coordinates come back exactly; the regenerated ones differ from the input, and
    a mask of ones is a plain edit."""
    gm = default_mixture()
    g = torch.Generator().manual_seed(3)
    x0 = gm.sample(8, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    mask = torch.zeros_like(x0)
    mask[:, : x0.shape[1] // 2] = 1
    gen = torch.Generator().manual_seed(9)
    out = editing.edit(gm.denoiser, x0, eps, 10, solver, 1.0, mask=mask, generator=gen)
    assert torch.equal(out[:, x0.shape[1] // 2 :], x0[:, x0.shape[1] // 2 :])
    assert (out[:, : x0.shape[1] // 2] - x0[:, : x0.shape[1] // 2]).abs().max() > 1e-3
    if solver != "ddpm":
        plain = editing.edit(gm.denoiser, x0, eps, 10, solver, 1.0)
        ones = editing.edit(gm.denoiser, x0, eps, 10, solver, 1.0, mask=torch.ones_like(x0))
        assert torch.allclose(plain, ones, atol=1e-12)


@pytest.mark.parametrize("solver", ENCODE_SOLVERS)
def test_encode_then_decode_converges_to_the_image(solver):
    """With the exact denoiser the ODE is invertible: the round-trip error falls with steps."""
    gm = default_mixture()
    x0 = gm.sample(16, torch.Generator().manual_seed(4))
    err = []
    for steps in (8, 32, 128):
        z = editing.encode(gm.denoiser, x0, steps, solver)
        err.append((editing.decode(gm.denoiser, z, steps, solver) - x0).norm(dim=1).mean().item())
    assert err[2] < err[1] < err[0]
    assert err[2] < (0.05 if solver in ("heun", "rk4") else 0.3), err


def test_encoding_needs_a_solver_that_runs_backwards():
    gm = default_mixture()
    x0 = gm.sample(2, torch.Generator().manual_seed(5))
    for solver in set(SOLVERS) - set(ENCODE_SOLVERS):
        with pytest.raises(ValueError, match="cannot"):
            editing.encode(gm.denoiser, x0, 4, solver)
        if not get_solver(solver).stochastic:
            with pytest.raises(ValueError, match="cannot integrate towards"):
                get_solver(solver).init(x0, torch.tensor(4), reverse=torch.ones(2, dtype=torch.bool))


def test_slerp_keeps_the_ends_and_the_norm():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(1, 1, 28, 28, generator=g), torch.randn(1, 1, 28, 28, generator=g)
    ts = editing.frames(5)
    z = editing.slerp(a.expand(5, -1, -1, -1), b.expand(5, -1, -1, -1), torch.tensor(ts))
    assert torch.allclose(z[0], a[0], atol=1e-6) and torch.allclose(z[-1], b[0], atol=1e-6)
    norms = z.flatten(1).norm(dim=1)
    assert (norms - a.norm()).abs().max() < 0.05 * a.norm()  # near-orthogonal ends: the norm is kept
    lerp_mid = (0.5 * a + 0.5 * b).norm()
    assert norms[2] > 1.3 * lerp_mid
    with pytest.raises(ValueError):
        editing.frames(1)
