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
from arcdiff.model.schedule import GRID_IDS, consistent_pair, grid_etas, tuned_eta, velocity
from arcdiff.model.solver_names import SOLVER_INFO, SOLVER_TABLE, resolve
from arcdiff.model.solvers import GRIDS, SOLVERS, RungeKutta, draw_noise, get_solver, nfe, sample, table_mismatches
from arcdiff.model.unet import UNet

GMM = default_mixture()


def x_T(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference():
    xT = x_T(128)
    return xT, sample(GMM.denoiser, xT, 1024, "rk4")  # rk4 error ~1e-12 here, far below the tested ones


def test_solver_names_and_nfe():
    assert SOLVERS[:6] == ("euler", "heun", "rk4", "ddim", "ddpm", "dpmpp2m")  # binding names keep their place
    assert SOLVERS[6:] == ("unipc2", "unipc3", "dpmpp3m", "dpmpp2m_sde")
    assert [nfe(s, 10) for s in SOLVERS] == [10, 20, 40] + [10] * 7
    with pytest.raises(ValueError, match="unknown solver 'foo'"):
        get_solver("foo")


@pytest.mark.parametrize("row", SOLVER_TABLE, ids=lambda r: r.name)
def test_the_solver_table_matches_each_implementation_field_by_field(row):
    """solver_names.SOLVER_TABLE (torch-free: the API, CLI and playground read it) against what
    each solver does: its declared fields, the network evaluations it makes, whether it draws
    noise, and the grid a request without one gets."""
    impl = get_solver(row.name)
    assert (impl.name, impl.nfe_per_step, impl.stochastic, impl.pair) == (
        row.name,
        row.nfe_per_step,
        row.stochastic,
        row.pair,
    )
    calls = []

    def counting(x, eta):
        calls.append(len(eta))
        return GMM.denoiser(x, eta)

    xT = x_T(4)
    a = sample(counting, xT, 3, row.name, generator=torch.Generator().manual_seed(1))
    assert len(calls) == row.nfe(3) == nfe(row.name, 3)
    b = sample(GMM.denoiser, xT, 3, row.name, generator=torch.Generator().manual_seed(2))
    assert (not torch.equal(a, b)) == row.stochastic  # only a stochastic solver depends on its noise
    assert row.default_grid in GRIDS and resolve(row.name, None, None)[2] == row.default_grid
    assert (row.pair == "predicted") == isinstance(impl, RungeKutta)  # the velocity-form solvers


def test_the_table_is_the_only_list():
    assert tuple(r.name for r in SOLVER_TABLE) == SOLVERS == tuple(SOLVER_INFO)
    assert table_mismatches() == []


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
        ("ddim", [64, 128, 256, 512], 1.0, 0.2),
        # the same end effect; UniPC-2's corrector raises it to about 2, the third-order solvers'
        # first-order warm-up step keeps them at about 2 too
        ("unipc2", [128, 256, 512, 1024], 2.0, 0.45),
        ("unipc3", [128, 256, 512, 1024], 2.0, 0.45),
        ("dpmpp3m", [128, 256, 512, 1024], 2.0, 0.45),
    ],
)
def test_convergence_order(reference, solver, steps, order, tol):
    xT, ref = reference
    errs = [rms(sample(GMM.denoiser, xT, n, solver), ref) for n in steps]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < tol, f"{solver}: fitted order {slope:.2f}, errors {errs}"


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b) ** 2).mean().sqrt().item()


def interior(steps: int, schedule: str) -> torch.Tensor:
    """`steps` steps of a tuned grid's spacing over one fixed sigma range, 5 to 0.05 (rho 7)."""
    t = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return tuned_eta(t, torch.tensor(GRID_IDS[schedule]), 5.0, 0.05, 7.0)


@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
@pytest.mark.parametrize(
    "solver, lo, hi",
    [
        ("ddim", 0.9, 1.2),
        ("dpmpp2m", 1.9, 2.4),
        ("unipc2", 2.5, 3.4),  # UniC adds one order to UniP-2
        ("unipc3", 2.5, 4.5),
        ("dpmpp3m", 2.1, 3.5),  # third order, less the first-order warm-up step's h^2
    ],
)
def test_convergence_order_on_tuned_spacing(schedule, solver, lo, hi):
    """Between the clipped ends the tuned grids are smooth non-uniform grids in lambda: the
    multistep solvers reach their order there (the end steps from pi/2 and to 0 are fixed-size
    first-order steps; test_full_tuned_grids_converge covers them)."""
    xT = x_T(64)
    ref = sample(GMM.denoiser, xT, 1024, "rk4", etas=interior(1024, schedule))
    steps = [8, 16, 32, 64]
    errs = [rms(sample(GMM.denoiser, xT, n, solver, etas=interior(n, schedule)), ref) for n in steps]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert lo < slope < hi, f"{solver} on {schedule}: fitted order {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("solver, schedule, order", [("rk4", "karras", 4.0), ("heun", "logsnr", 2.0)])
def test_runge_kutta_on_tuned_spacing(solver, schedule, order):
    """The RK solvers keep their order on the tuned grids' non-uniform spacing."""
    xT = x_T(64)
    ref = sample(GMM.denoiser, xT, 1024, "rk4", etas=interior(1024, schedule))
    steps = [8, 16, 32, 64]
    errs = [rms(sample(GMM.denoiser, xT, n, solver, etas=interior(n, schedule)), ref) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, f"{solver} on {schedule}: fitted order {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("solver", ["dpmpp2m", "unipc2", "unipc3", "dpmpp3m", "ddim", "heun", "rk4"])
def test_full_tuned_grids_converge(reference, solver):
    """On the full tuned grids, end steps included, the error keeps falling with the step count:
    their range widens with it (schedule.tuned_range), so the first-order end steps shrink too."""
    xT, ref = reference
    for schedule in ("karras", "logsnr"):
        errs = [rms(sample(GMM.denoiser, xT, n, solver, schedule=schedule), ref) for n in (10, 20, 40, 80, 160)]
        assert all(a > b for a, b in itertools.pairwise(errs)), (schedule, errs)
        assert errs[-1] < 0.25 * errs[1], (schedule, errs)


def _off_constraint(x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact denoiser with heads that disagree with x like a dual-head network's: x0_hat off by
    5% of x, eps_hat by -3% (x != cos x0_hat + sin eps_hat); their velocity is a smooth field."""
    x0, eps = GMM.denoiser(x, eta)
    return x0 + 0.05 * x, eps - 0.03 * x


def test_projection_makes_x0_eps_solvers_follow_the_velocity_ode():
    """With heads off the constraint, ddim and dpmpp2m on the projected pair converge to the
    solution of dx/deta = v_hat (what rk4 integrates); on the heads as predicted they do not."""
    xT = x_T(64)
    ref = sample(_off_constraint, xT, 1024, "rk4")
    for solver in ("ddim", "dpmpp2m"):
        impl = get_solver(solver)
        assert impl.pair == "projected"
        proj = [rms(sample(_off_constraint, xT, n, impl), ref) for n in (32, 64, 128, 256)]
        pred = [rms(sample(_off_constraint, xT, n, impl.variant("predicted")), ref) for n in (32, 64, 128, 256)]
        assert all(a > b for a, b in itertools.pairwise(proj)) and proj[-1] < 0.01, (solver, proj)
        assert pred[-1] > 3 * proj[-1], (solver, pred, proj)


def test_consistent_pair():
    g = torch.Generator().manual_seed(4)
    x, x0_hat, eps_hat = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    eta = torch.tensor([0.0, 0.2, 0.7, 1.3, math.pi / 2], dtype=torch.float64)
    x0, eps = consistent_pair(x, x0_hat, eps_hat, eta)
    c, s = torch.cos(eta)[:, None], torch.sin(eta)[:, None]
    assert torch.allclose(c * x0 + s * eps, x)  # on the constraint
    assert torch.allclose(velocity(x0, eps, eta), velocity(x0_hat, eps_hat, eta))  # same velocity
    r = x - c * x0_hat - s * eps_hat
    assert torch.allclose(x0, x0_hat + c * r) and torch.allclose(eps, eps_hat + s * r)
    a, b = consistent_pair(x, x0, eps, eta)  # a consistent pair is a fixed point
    assert torch.allclose(a, x0) and torch.allclose(b, eps)


def _diffusers_run(scheduler, etas: torch.Tensor, xT: torch.Tensor, generator: torch.Generator | None):
    """Drive a diffusers multistep scheduler (prediction_type "sample": the model output is x0)
    through the grid `etas` (its sigmas are tan(eta), the VE noise levels of the same x)."""
    n = len(etas) - 1
    scheduler.set_timesteps(n)
    scheduler.sigmas = torch.tan(etas).clone()
    scheduler.sigmas[-1] = 0.0
    x = xT.clone()
    for k, t in enumerate(scheduler.timesteps):
        x0, _ = GMM.denoiser(x, torch.full((x.shape[0],), float(etas[k]), dtype=torch.float64))
        kw = {"variance_noise": torch.randn(x.shape, generator=generator, dtype=x.dtype)} if generator else {}
        x = scheduler.step(x0, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("steps", [4, 8, 20])
@pytest.mark.parametrize(
    "solver, make, tol",
    [
        ("unipc2", lambda d: d.UniPCMultistepScheduler(solver_order=2, prediction_type="sample"), 1e-12),
        ("unipc3", lambda d: d.UniPCMultistepScheduler(solver_order=3, prediction_type="sample"), 1e-12),
        # diffusers' DPM-Solver step runs in float32 (it upcasts half inputs to float32 and back)
        ("dpmpp2m", lambda d: d.DPMSolverMultistepScheduler(solver_order=2, prediction_type="sample"), 5e-6),
        ("dpmpp3m", lambda d: d.DPMSolverMultistepScheduler(solver_order=3, prediction_type="sample"), 5e-6),
        (
            "dpmpp2m_sde",
            lambda d: d.DPMSolverMultistepScheduler(
                solver_order=2, prediction_type="sample", algorithm_type="sde-dpmsolver++"
            ),
            5e-6,
        ),
    ],
)
def test_matches_diffusers(solver, make, tol, steps):
    """On consistent inputs (the exact denoiser) and the same finite grid, each multistep solver
    gives diffusers' trajectory (its scheduler with lower_order_final and a final step to 0)."""
    diffusers = pytest.importorskip("diffusers")
    sig = np.geomspace(20.0, 0.05, steps)
    etas = torch.tensor(np.concatenate([np.arctan(sig), [0.0]]), dtype=torch.float64)
    xT = x_T(16, seed=7)
    stochastic = get_solver(solver).stochastic
    theirs = _diffusers_run(make(diffusers), etas, xT, torch.Generator().manual_seed(3) if stochastic else None)
    ours = sample(GMM.denoiser, xT, steps, solver, generator=torch.Generator().manual_seed(3), etas=etas)
    assert (ours - theirs).abs().max().item() < tol


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


@pytest.mark.parametrize("solver, steps, schedule", [("ddpm", 200, "uniform"), ("dpmpp2m_sde", 50, "karras")])
def test_stochastic_matches_mixture(solver, steps, schedule):
    g = torch.Generator().manual_seed(2)
    _assert_matches_mixture(sample(GMM.denoiser, x_T(4000, seed=2), steps, solver, generator=g, schedule=schedule))


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp2m_sde"])
def test_stochastic_depends_on_generator_only(solver):
    xT = x_T(8)
    a = sample(GMM.denoiser, xT, 20, solver, generator=torch.Generator().manual_seed(5))
    b = sample(GMM.denoiser, xT, 20, solver, generator=torch.Generator().manual_seed(5))
    c = sample(GMM.denoiser, xT, 20, solver, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("solver", SOLVERS)
def test_mixed_state_equals_separate_runs(solver):
    """Samples with different step counts and time grids, joining at different times and leaving
    when done, in one state: each ends exactly where it would alone (the engine relies on this)."""
    impl = get_solver(solver)
    xT = x_T(3, seed=3)
    steps = [3, 7, 12]
    grids = ["karras", "uniform", "logsnr"]
    alone = [
        sample(
            GMM.denoiser,
            xT[k : k + 1],
            steps[k],
            solver,
            generator=[torch.Generator().manual_seed(10 + k)],
            schedule=grids[k],
        )
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
            new = impl.init(xT[joining], torch.tensor([steps[k] for k in joining]), [grids[k] for k in joining])
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


MULTISTEP = ["dpmpp2m", "dpmpp3m", "dpmpp2m_sde", "unipc2", "unipc3"]


@pytest.mark.parametrize("solver", MULTISTEP)
def test_step_tables_equal_the_coefficients_of_explicit_grids(solver):
    """A named grid reads its update coefficients from the solver's shared table, explicit etas
    compute them for the state: the same grid both ways gives the same samples, at every step
    count (1 to 3 steps: the first and last steps' special cases overlap)."""
    xT = x_T(4, seed=4)
    for grid, steps in itertools.product(GRIDS, [1, 2, 3, 5, 16]):
        etas = grid_etas(steps, grid)[None].expand(4, -1)
        a = sample(GMM.denoiser, xT, steps, solver, generator=torch.Generator().manual_seed(1), schedule=grid)
        b = sample(GMM.denoiser, xT, steps, solver, generator=torch.Generator().manual_seed(1), etas=etas)
        assert torch.allclose(a, b, atol=1e-12, rtol=0), (grid, steps)


def test_step_tables_hold_one_block_per_grid_and_step_count():
    impl = get_solver("unipc3")
    xT = x_T(3, seed=5)
    impl.init(xT, torch.tensor([7, 9, 7]), ["karras", "karras", "logsnr"])
    data = impl.tables.data(xT.device, xT.dtype)
    st = impl.init(xT, torch.tensor([9, 7, 7]), ["karras", "karras", "logsnr"])
    assert impl.tables.data(xT.device, xT.dtype) is data  # nothing new: no block built twice
    assert st["row"][1] != st["row"][2]  # same step count, other grid: its own block
    rows = data[st["row"][0] : st["row"][0] + 9]
    assert rows.shape[0] == 9 and torch.isfinite(rows).all()


def test_unet_sample_does_not_depend_on_batch():
    """Same seed, same image, whatever else is in the batch (float32, CPU, within 1e-5)."""
    torch.manual_seed(0)
    net = UNet(get_config("tiny")).eval()
    den = Denoiser(net, "x0_eps")
    seeds = [3, 4, 5, 6, 7]
    noise = torch.stack([torch.randn(1, 8, 8, generator=image_generator(s)) for s in seeds])
    for solver in ("rk4", "ddpm", "dpmpp2m", "unipc3", "dpmpp2m_sde"):
        gens = [image_generator(1000 + s) for s in seeds]
        batch = sample(den, noise, 6, solver, generator=gens, schedule="karras")
        one = sample(den, noise[2:3], 6, solver, generator=[image_generator(1000 + seeds[2])], schedule="karras")
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
            for schedule in GRIDS:
                out = sample(clipped, x, 3, solver, generator=torch.Generator().manual_seed(0), schedule=schedule)
                assert torch.isfinite(out).all(), (prediction, solver, schedule)
