"""Solvers against an exact denoiser (a Gaussian mixture's posterior mean), one shared base for all."""

import itertools
import math

import numpy as np
import pytest
import torch
from gmm import default_mixture

from arcdiff.model.configs import get_config
from arcdiff.model.denoiser import Denoiser
from arcdiff.model.rng import image_generator
from arcdiff.model.solvers import SOLVERS, draw_noise, get_solver, nfe, sample
from arcdiff.model.unet import UNet

GMM = default_mixture()


def x_T(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference():
    xT = x_T(128)
    return xT, sample(GMM.denoiser, xT, 1024, "rk4")  # rk4 error ~1e-12 here, far below the tested ones


def test_solver_names_and_nfe():
    assert SOLVERS == ("euler", "heun", "rk4", "ddim", "ddpm", "dpmpp2m")
    assert [nfe(s, 10) for s in SOLVERS] == [10, 20, 40, 10, 10, 10]
    with pytest.raises(ValueError, match="unknown solver 'foo'"):
        get_solver("foo")


@pytest.mark.parametrize(
    "solver, steps, order, tol",
    [
        ("euler", [64, 128, 256, 512], 1.0, 0.2),
        ("heun", [32, 64, 128, 256], 2.0, 0.2),
        ("rk4", [16, 32, 64, 128], 4.0, 0.3),
        # The uniform eta grid is infinitely long in lambda = log(cot eta) at both ends: the
        # few steps next to eta = 0 and pi/2 keep an O(h^2 / k) local error, and the global error
        # behaves like h^2 log(1/h), whose fitted slope approaches 2 from below.
        ("dpmpp2m", [128, 256, 512, 1024], 2.0, 0.45),
    ],
)
def test_convergence_order(reference, solver, steps, order, tol):
    xT, ref = reference
    errs = [((sample(GMM.denoiser, xT, n, solver) - ref) ** 2).mean().sqrt().item() for n in steps]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < tol, f"{solver}: fitted order {slope:.2f}, errors {errs}"


def _assert_matches_mixture(x: torch.Tensor):
    n = x.shape[0]
    mean, cov = GMM.mean(), GMM.cov()
    # mean within 4 standard errors; covariance entries within 4 of their standard errors
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se_mean).all(), (x.mean(0), mean)
    se_cov = (2 * torch.outer(torch.diagonal(cov), torch.diagonal(cov)) / n).sqrt() * 1.5  # mixture kurtosis margin
    assert ((torch.cov(x.T) - cov).abs() < 4 * se_cov).all(), (torch.cov(x.T), cov)


def test_rk4_20_steps_matches_mixture():
    _assert_matches_mixture(sample(GMM.denoiser, x_T(4000, seed=1), 20, "rk4"))


def test_ddpm_matches_mixture():
    g = torch.Generator().manual_seed(2)
    _assert_matches_mixture(sample(GMM.denoiser, x_T(4000, seed=2), 200, "ddpm", generator=g))


def test_ddpm_depends_on_generator_only():
    xT = x_T(8)
    a = sample(GMM.denoiser, xT, 20, "ddpm", generator=torch.Generator().manual_seed(5))
    b = sample(GMM.denoiser, xT, 20, "ddpm", generator=torch.Generator().manual_seed(5))
    c = sample(GMM.denoiser, xT, 20, "ddpm", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("solver", SOLVERS)
def test_mixed_state_equals_separate_runs(solver):
    """Samples with different step counts, joining at different times and leaving when done, in
    one state: each ends exactly where it would alone (the engine relies on this)."""
    impl = get_solver(solver)
    xT = x_T(3, seed=3)
    steps = [3, 7, 12]
    alone = [
        sample(GMM.denoiser, xT[k : k + 1], steps[k], solver, generator=[torch.Generator().manual_seed(10 + k)])
        for k in range(3)
    ]
    gens = {k: torch.Generator().manual_seed(10 + k) for k in range(3)}
    active: list[int] = []
    st = None
    out: dict[int, torch.Tensor] = {}
    tick = 0
    while len(out) < 3:
        joining = {0: [0, 1], 5: [2]}.get(tick, [])  # samples 0 and 1 start together, 2 joins later
        if joining:
            new = impl.init(xT[joining], torch.tensor([steps[k] for k in joining]))
            st = new if st is None else {key: torch.cat([st[key], new[key]]) for key in st}
            active += joining
        x, eta = impl.point(st)
        x0_hat, eps_hat = GMM.denoiser(x, eta)
        noise = draw_noise(x, [gens[k] for k in active]) if impl.stochastic else None
        finished = impl.advance(st, x0_hat, eps_hat, noise)
        for j in finished.nonzero().flatten().tolist():
            out[active[j]] = st["x"][j]
        keep = ~finished
        st = {key: v[keep] for key, v in st.items()}
        active = [k for k, f in zip(active, finished.tolist(), strict=True) if not f]
        tick += 1
    for k in range(3):
        assert torch.allclose(out[k], alone[k][0], atol=1e-12, rtol=0), (solver, k)


def test_unet_sample_does_not_depend_on_batch():
    """Same seed, same image, whatever else is in the batch (float32, CPU, within 1e-5)."""
    torch.manual_seed(0)
    net = UNet(get_config("tiny")).eval()
    den = Denoiser(net, "x0_eps")
    seeds = [3, 4, 5, 6, 7]
    noise = torch.stack([torch.randn(1, 8, 8, generator=image_generator(s)) for s in seeds])
    for solver in ("rk4", "ddpm", "dpmpp2m"):
        batch = sample(den, noise, 6, solver, generator=[image_generator(1000 + s) for s in seeds])
        one = sample(den, noise[2:3], 6, solver, generator=[image_generator(1000 + seeds[2])])
        assert (batch[2] - one[0]).abs().max() < 1e-5, solver


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_single_head_adapters_are_consistent_and_finite(prediction):
    """A one-head model's derived estimate satisfies x = cos x0_hat + sin eps_hat away from the
    clipping, and stays finite at both ends of the eta axis."""
    torch.manual_seed(1)
    net = UNet(get_config("tiny", heads=1)).eval()
    den = Denoiser(net, prediction, clip=None)
    x = torch.randn(4, 1, 8, 8)
    eta = torch.tensor([0.3, 0.8, 1.2, 1.0])
    with torch.no_grad():
        x0_hat, eps_hat = den(x, eta)
        c, s = torch.cos(eta)[:, None, None, None], torch.sin(eta)[:, None, None, None]
        assert torch.allclose(c * x0_hat + s * eps_hat, x, atol=1e-5)
        ends = torch.tensor([0.0, math.pi / 2, 0.0, math.pi / 2])
        clipped = Denoiser(net, prediction, clip=1.0)
        a, b = clipped(x, ends)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        if prediction == "eps":
            assert a.abs().max() <= 1.0
        for solver in SOLVERS:
            out = sample(clipped, x, 3, solver, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(out).all(), (prediction, solver)
