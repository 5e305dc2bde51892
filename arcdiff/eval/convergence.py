"""How close each ODE solver gets to the exact solution of the sampling ODE of a real model.

    arcdiff eval convergence --models mnist,mnist-eps --out eval/convergence

For 16 images (image seeds 0..15, the same noise as `arcdiff generate --seed 0 -n 16`) the
reference is the solution of dx/deta = v_hat(x, eta) from pi/2 to 0 by an adaptive Runge-Kutta
4(5) (scipy's solve_ivp, RK45, rtol = atol = 1e-6), with the network in float64 so the right-hand
side is smooth to the tolerance. Every solver runs on the same float64 network; the table gives
the RMS error in pixel values (data range [-1, 1]) of its final x against the reference.

Variants measured per solver (the choice in model/solvers.py follows from them):
- pair: the heads as predicted, or projected onto x = cos x0 + sin eps (schedule.consistent_pair);
- clip (one-head eps models): the derived x0_hat clipped to the data range at every evaluation,
  or not clipped;
- grid: uniform eta, logsnr, karras (schedule.grid_eta); the tuned grids' range widens with the
  step count (schedule.tuned_range), so their first-order end steps shrink as steps grow.
Writes OUT/convergence.md and OUT/convergence.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from arcdiff.eval.entry import module_main

STEPS = (5, 10, 20, 40, 80)
ODE_SOLVERS = ("euler", "heun", "rk4", "ddim", "dpmpp2m", "unipc2", "unipc3", "dpmpp3m")


def reference_solution(denoiser, x_T, rtol: float = 1e-6, atol: float = 1e-6):
    """x(0) of dx/deta = v_hat from eta = pi/2, by scipy's RK45; returns (x0, evaluations)."""
    import numpy as np
    import torch
    from scipy.integrate import solve_ivp  # type: ignore[import-untyped]

    from arcdiff.model.schedule import ETA_MAX, velocity

    shape = x_T.shape
    calls = 0

    def rhs(eta: float, y: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        x = torch.from_numpy(y).reshape(shape)
        e = torch.full((shape[0],), eta, dtype=torch.float64)
        x0_hat, eps_hat = denoiser(x, e)
        return velocity(x0_hat, eps_hat, e).reshape(-1).numpy()

    sol = solve_ivp(rhs, (ETA_MAX, 0.0), x_T.reshape(-1).numpy(), method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference integration failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape), calls


def rms(a, b) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, on its own parser (`python -m arcdiff.eval.convergence`) or on `arcdiff eval convergence`."""
    p.add_argument("--models", default="mnist,mnist-eps")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    p.add_argument("--solvers", default=",".join(ODE_SOLVERS))
    p.add_argument("--grids", default="uniform,logsnr,karras")
    p.add_argument("--pairs", default="predicted,projected", help="pair variants for the x0/eps solvers")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="eval/convergence")


def main(argv: list[str] | None = None) -> int:
    return module_main("arcdiff eval convergence", __doc__, add_arguments, run, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Integrate and compare; `argv`, the command's own arguments, is recorded as the command."""

    import torch

    from arcdiff.model import schedule
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.model.rng import image_generator, image_seed, initial_noise
    from arcdiff.model.solvers import RungeKutta, get_solver, sample

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    registry = ModelRegistry(args.model_dir)
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        loaded = registry.load(name)
        den = loaded.denoiser.double().eval()
        x_T = torch.stack(
            [initial_noise(loaded.image_shape, image_generator(image_seed(0, k))) for k in range(args.images)]
        ).double()
        clip0 = getattr(den, "clip", None)
        clips = [clip0, None] if loaded.config["prediction"] == "eps" else [clip0]
        for clip in clips:
            setattr(den, "clip", clip)  # noqa: B010 (the denoiser is typed as a plain Module)
            t0 = time.time()
            with torch.no_grad():
                ref, calls = reference_solution(den, x_T)
            print(f"{name} clip={clip}: reference in {calls} evaluations, {time.time() - t0:.0f} s", flush=True)
            for solver in args.solvers.split(","):
                base = get_solver(solver)
                pairs = ["predicted"] if isinstance(base, RungeKutta) else args.pairs.split(",")
                for pair in pairs:
                    impl = base.variant(pair)
                    for grid in args.grids.split(","):
                        errs = [rms(sample(den, x_T, n, impl, schedule=grid), ref) for n in steps]
                        row = {
                            "model": name,
                            "clip": clip,
                            "solver": solver,
                            "pair": pair,
                            "grid": grid,
                            "steps": steps,
                            "nfe": [base.nfe(n) for n in steps],
                            "rms": errs,
                        }
                        rows.append(row)
                        print(
                            f"{name:10s} clip={clip!s:5s} {solver:8s} {pair:9s} {grid:7s} "
                            + " ".join(f"{e:.4f}" for e in errs),
                            flush=True,
                        )
    command = "arcdiff eval convergence " + " ".join(argv)
    meta = {
        "command": command,
        "tuned_range": {str(n): [round(float(v), 4) for v in schedule.tuned_range(torch.tensor([n]))] for n in steps},
        "images": args.images,
        "rows": rows,
    }
    (out / "convergence.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        f"RMS error (pixel values in [-1, 1]) against the RK45 reference (rtol = atol = 1e-6), {args.images} "
        f"images; the tuned grids' sigma range per step count is schedule.tuned_range (in the JSON).",
        "",
        f"Reproduce: `{command}`",
        "",
        "| model | clip | solver | pair | grid | " + " | ".join(f"{n} steps" for n in steps) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---:" for _ in steps) + " |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'on' if r['clip'] else 'off'} | {r['solver']} | {r['pair']} | {r['grid']} | "
            + " | ".join(f"{e:.3f}" if math.isfinite(e) else "nan" for e in r["rms"])
            + " |"
        )
    (out / "convergence.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'convergence.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
