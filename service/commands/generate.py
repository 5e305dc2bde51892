"""`arcdiff generate`: sample a grid of images locally, no server."""

from __future__ import annotations

import argparse
import sys

HELP = """Sample N images with a model and write them as one grid PNG.

Image k uses seed (SEED + k) mod 2^32, the same images the API returns for that request."""


def register(sub: argparse._SubParsersAction) -> None:
    from worker.jobs import MAX_STEPS, SOLVER_NAMES

    p = sub.add_parser("generate", help="sample images locally into a grid PNG", description=HELP)
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see ARCDIFF_MODEL_DIR)")
    p.add_argument("--steps", type=int, default=10, metavar="N", help=f"solver steps, 1..{MAX_STEPS} (default 10)")
    p.add_argument("--solver", default="rk4", choices=SOLVER_NAMES, help="solver (default rk4)")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="seed of image 0 (default 0)")
    p.add_argument("-n", type=int, default=16, metavar="COUNT", help="number of images (default 16)")
    p.add_argument("-o", "--out", default="samples.png", metavar="FILE.png", help="output PNG (default samples.png)")
    p.add_argument("--nrow", type=int, metavar="N", help="images per grid row (default: square)")
    p.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N (default auto)")
    p.add_argument("--model-dir", metavar="DIR", help="folder of model folders (default ARCDIFF_MODEL_DIR or bundled)")
    p.add_argument("--batch", type=int, default=64, metavar="B", help="images per network evaluation (default 64)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from model.registry import ModelRegistry
    from model.rng import SEED_MAX, image_generator, image_seed, initial_noise
    from model.solvers import nfe, sample
    from worker.encode import grid, png_bytes, to_uint8
    from worker.jobs import MAX_STEPS
    from worker.loading import resolve_device

    problems = []
    if not 1 <= args.steps <= MAX_STEPS:
        problems.append(f"--steps must be in 1..{MAX_STEPS}")
    if not 0 <= args.seed <= SEED_MAX:
        problems.append(f"--seed must be in 0..{SEED_MAX}")
    if args.n < 1 or args.batch < 1:
        problems.append("-n and --batch must be at least 1")
    registry = ModelRegistry(args.model_dir)
    if args.model not in registry.models:
        problems.append(f"unknown model {args.model!r} in {registry.root}; known: {', '.join(registry.names()) or 'none'}")
    if problems:
        print("arcdiff generate: " + "; ".join(problems), file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    loaded = registry.load(args.model, device=device)
    t0 = time.perf_counter()
    chunks = []
    with torch.inference_mode():
        for start in range(0, args.n, args.batch):
            gens = [image_generator(image_seed(args.seed, k)) for k in range(start, min(args.n, start + args.batch))]
            x_T = torch.stack([initial_noise(loaded.image_shape, g) for g in gens]).to(device)
            x0 = sample(loaded.denoiser, x_T, args.steps, args.solver, generator=gens)
            chunks.append(to_uint8(x0, loaded.config.get("data_range", [-1.0, 1.0])))
    pixels = torch.cat(chunks)
    with open(args.out, "wb") as f:
        f.write(png_bytes(grid(pixels, args.nrow)))
    print(f"wrote {args.out}: {args.n} images of {args.model} ({'x'.join(map(str, loaded.image_shape))}), "
          f"{args.solver} {args.steps} steps = {nfe(args.solver, args.steps)} NFE each, seeds "
          f"{image_seed(args.seed, 0)}..{image_seed(args.seed, args.n - 1)}, {time.perf_counter() - t0:.2f} s on {device}")
    return 0
