import math

import pytest
import torch

from arcdiff.model import schedule as S


def test_angle_schedule_identities():
    T = 1000
    etas = S.angle_etas(T)
    assert etas[0] == 0 and torch.isclose(etas[-1], torch.tensor(math.pi / 2, dtype=torch.float64))
    ab = S.angle_alpha_bar(T)
    assert torch.allclose(ab, torch.cos(etas[1:]) ** 2)
    betas = S.angle_betas(T)
    # beta_t = 1 - cos^2(eta_t) / cos^2(eta_{t-1}); the last one reaches 1 and is clipped
    expected = 1 - torch.cos(etas[1:]) ** 2 / torch.cos(etas[:-1]) ** 2
    assert torch.allclose(betas[:-1], expected[:-1])
    assert expected[-1] == 1.0 and betas[-1] == 0.999
    # cumprod(1 - beta) gives alpha_bar back wherever no clipping happened
    assert torch.allclose(S.alpha_bar_from_betas(betas)[:-1], ab[:-1], rtol=1e-9, atol=1e-12)
    assert (betas[1:] >= betas[:-1]).all(), "angle betas increase with t"


def test_eta_round_trips():
    eta = torch.linspace(0, math.pi / 2, 101, dtype=torch.float64)
    assert torch.allclose(S.eta_from_alpha_bar(S.alpha_bar_from_eta(eta)), eta, atol=1e-7)
    ab = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(S.alpha_bar_from_eta(S.eta_from_alpha_bar(ab)), ab, atol=1e-12)


def test_linear_beta_schedule_on_eta_axis():
    betas = S.linear_betas(1000)
    assert torch.isclose(betas[0], torch.tensor(1e-4, dtype=torch.float64)) and torch.isclose(
        betas[-1], torch.tensor(0.02, dtype=torch.float64)
    )
    etas = S.linear_etas(1000)
    ab = S.alpha_bar_from_betas(betas)
    assert etas.shape == (1000,)
    assert (etas[1:] > etas[:-1]).all()
    assert torch.allclose(torch.cos(etas) ** 2, ab)
    # DDPM's alpha_bar_T is about 4e-5: the linear schedule stops short of pi/2
    assert 1.55 < etas[-1] < math.pi / 2
    assert torch.isclose(ab[-1], torch.tensor(4.04e-5, dtype=torch.float64), rtol=0.02)


def test_eta_to_timestep_interpolates_and_clamps():
    etas = S.linear_etas(1000)
    t = S.eta_to_timestep(etas[[0, 10, 999]], etas)
    assert torch.allclose(t, torch.tensor([0.0, 10.0, 999.0], dtype=torch.float64))
    mid = (etas[10] + etas[11]) / 2
    assert abs(S.eta_to_timestep(mid[None], etas).item() - 10.5) < 1e-6
    out = S.eta_to_timestep(torch.tensor([0.0, math.pi / 2], dtype=torch.float64), etas)
    assert out.tolist() == [0.0, 999.0]


def test_grid_eta_matches_uniform_grid():
    for steps in (1, 7, 50):
        grid = S.uniform_eta_grid(steps)
        i = torch.arange(steps + 1)
        assert torch.allclose(S.grid_eta(i, torch.full_like(i, steps)), grid)
        assert grid[0] == math.pi / 2 and grid[-1] == 0


def test_forward_process_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    eta = torch.tensor([0.0, 0.3, 1.0, math.pi / 2])
    x = S.q_sample(x0, eps, eta)
    assert torch.allclose(x[0], x0[0]) and torch.allclose(x[3], eps[3], atol=1e-6)
    # v is the derivative of x along eta
    h = 1e-3
    dx = (S.q_sample(x0, eps, eta + h) - S.q_sample(x0, eps, eta - h)) / (2 * h)
    assert torch.allclose(S.velocity(x0, eps, eta), dx, atol=1e-3)
    lam = S.log_snr_half(torch.tensor([math.pi / 4]))
    assert abs(lam.item()) < 1e-6


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 10, 50])
def test_tuned_grids(steps):
    """Explicit first step from pi/2 and last step to 0; in between, sigma_max down to sigma_min of
    tuned_range(steps), uniform in lambda (logsnr) or in sigma^(1/rho) (karras)."""
    sigma_max, sigma_min, rho = (float(v) for v in S.tuned_range(torch.tensor([steps])))
    for name in ("logsnr", "karras"):
        g = S.grid_etas(steps, name)
        assert len(g) == steps + 1 and g[0] == math.pi / 2 and g[-1] == 0
        assert (g[1:] < g[:-1]).all()
        inner = g[1:-1]
        if steps >= 3:
            sigma = torch.tan(inner)
            assert torch.isclose(sigma[0], torch.tensor(sigma_max, dtype=torch.float64))
            assert torch.isclose(sigma[-1], torch.tensor(sigma_min, dtype=torch.float64))
            spacing = -torch.log(sigma) if name == "logsnr" else sigma ** (1 / rho)
            assert torch.allclose(spacing.diff(), spacing.diff()[0].expand(steps - 2)), name
            assert torch.allclose(S.log_snr_half(inner), -torch.log(sigma))
    assert torch.allclose(S.grid_etas(steps, "uniform"), S.uniform_eta_grid(steps), rtol=0, atol=1e-15)


def test_tuned_range_widens_with_steps():
    """The measured knots are hit exactly; between and beyond them sigma_max never falls and
    sigma_min never grows with the step count, and past the last measured knot both end steps
    keep shrinking (sigma_max like sqrt(n), sigma_min like 1/n)."""
    for steps, sigma_max, sigma_min, rho in S.TUNED_KNOTS:
        got = [float(v) for v in S.tuned_range(torch.tensor([int(steps)]))]
        assert got == pytest.approx([sigma_max, sigma_min, rho], rel=1e-12)
    n = torch.arange(1, 5001)
    sigma_max, sigma_min, rho = S.tuned_range(n)
    assert (sigma_max.diff() >= 0).all() and (sigma_min.diff() <= 0).all() and (sigma_min < sigma_max).all()
    assert (rho.diff() >= -1e-12).all() and float(rho[0]) == pytest.approx(1.5) and float(rho[-1]) == pytest.approx(7.0)
    big = (n >= 10) & (n <= 4000)
    assert (sigma_max[big].diff() > 0).all() and (sigma_min[big].diff() < 0).all()
    assert torch.allclose(sigma_max[[79, 159]] ** 2 / n[[79, 159]], torch.tensor(160.0, dtype=torch.float64))
    assert torch.allclose(sigma_min[[79, 159]] * n[[79, 159]], torch.tensor(0.8, dtype=torch.float64))


def test_grid_eta_per_sample_grids():
    """One call serves samples on different grids and step counts, each as if alone."""
    ids = torch.tensor([0, 1, 2, 2, 1])
    n = torch.tensor([5, 7, 3, 12, 1])
    names = ["uniform", "logsnr", "karras", "karras", "logsnr"]
    for i in range(13):
        k = torch.full_like(n, i).minimum(n)
        got = S.grid_eta(k, n, ids)
        want = torch.stack([S.grid_etas(int(n[j]), names[j])[int(k[j])] for j in range(5)])
        assert torch.equal(got, want)


def test_grid_eta_table_equals_the_formula():
    """The lookup table grid_eta reads (grown on demand) holds exactly the defining formula's values."""
    S._GRID_TABLE.clear()
    gen = torch.Generator().manual_seed(0)
    for top in (7, 40, 300):  # each one grows the table
        n = torch.randint(1, top + 1, (500,), generator=gen)
        i = (torch.rand(500, generator=gen) * (n + 1)).long()
        grid = torch.randint(0, 3, (500,), generator=gen)
        assert torch.allclose(S.grid_eta(i, n, grid), S._grid_eta_formula(i, n, grid), rtol=0, atol=1e-14)
        assert S._GRID_TABLE[torch.device("cpu")].shape[1] > top
