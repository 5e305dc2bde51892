"""`arcdiff generate`: sample a grid of images locally, or ask a running service (`--url`)."""

from __future__ import annotations

import argparse
import os
import sys

HELP = """Sample N images with a model and write them as one grid PNG.

Image k uses seed (SEED + k) mod 2^32, the same images the API returns for that request.
With --url the images come from a running service (arcdiff.client) instead of local sampling."""


def register(sub: argparse._SubParsersAction) -> None:
    from arcdiff.contract import MAX_STEPS, PRIORITIES, SCHEDULE_NAMES, SOLVER_NAMES
    from arcdiff.model.solver_names import (
        DEFAULT_NFE,
        DEFAULT_SOLVER,
        DEFAULT_STEPS,
        FEW_STEPS_MAX,
        FEW_STEPS_SOLVER,
        GRIDS,
        SOLVER_TABLE,
        solvers_with_grid,
    )

    # help from the solver table (model.solver_names), the one the API's schema reads
    solver_help = "; ".join(f"{s.name}: {s.summary}" for s in SOLVER_TABLE)
    grid_defaults = "; ".join(f"{g} for {'/'.join(solvers_with_grid(g))}" for g in GRIDS if solvers_with_grid(g))

    p = sub.add_parser("generate", help="sample images locally into a grid PNG", description=HELP)
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see ARCDIFF_MODEL_DIR)")
    p.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help=f"solver steps, 1..{MAX_STEPS} (default: {DEFAULT_STEPS} for the default solver, else about "
        f"{DEFAULT_NFE} network evaluations)",
    )
    p.add_argument(
        "--solver",
        choices=SOLVER_NAMES,
        help=f"solver (default {DEFAULT_SOLVER}, the measured best at 10 NFE; {FEW_STEPS_SOLVER} when --steps is at "
        f"most {FEW_STEPS_MAX}; a distilled model: the one it was distilled for). {solver_help}",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULE_NAMES,
        help=f"time grid (default: the solver's own, {grid_defaults})",
    )
    p.add_argument("--seed", type=int, default=0, metavar="K", help="seed of image 0 (default 0)")
    p.add_argument("-n", type=int, default=16, metavar="COUNT", help="number of images (default 16)")
    p.add_argument("-o", "--out", default="samples.png", metavar="FILE.png", help="output PNG (default samples.png)")
    p.add_argument("--nrow", type=int, metavar="N", help="images per grid row (default: square)")
    p.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N (default auto)")
    p.add_argument("--model-dir", metavar="DIR", help="folder of model folders (default ARCDIFF_MODEL_DIR or bundled)")
    p.add_argument("--batch", type=int, default=64, metavar="B", help="images per network evaluation (default 64)")
    p.add_argument(
        "--amp",
        choices=("auto", "none", "bf16", "fp16"),
        default="auto",
        help="autocast the network (solver state stays float32); auto: as a worker on this device does, bf16 on "
        "CUDA and on CPUs with native bf16, so local and served images match (default auto)",
    )
    p.add_argument(
        "--url",
        metavar="URL",
        help="ask the service at URL (e.g. http://localhost:8000) instead of "
        "sampling locally; --device, --model-dir and --batch then do not apply",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("ARCDIFF_API_KEY") or None,
        help="with --url: the service's API key (default ARCDIFF_API_KEY)",
    )
    p.add_argument(
        "--priority",
        choices=PRIORITIES,
        help="with --url: interactive (the server's default) or batch (fills the time interactive requests leave)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="with --url: seconds to wait for the images, retries included (default 600)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.url:  # what the flags leave out, the service fills in (the same defaults, see below)
        return run_remote(args)
    import time

    import torch

    from arcdiff.contract import MAX_STEPS
    from arcdiff.model.images import grid, png_bytes, to_uint8
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.model.rng import SEED_MAX, image_generator, image_seed, initial_noise
    from arcdiff.model.solvers import nfe, sample
    from arcdiff.worker.loading import AMP_DTYPES, resolve_device, resolve_speed

    registry = ModelRegistry(args.model_dir)
    if args.model in registry.models:
        # the same defaults as the API: ModelInfo.resolve (solver_names.resolve, or a distilled
        # student's own solver, steps and grid)
        args.solver, args.steps, args.schedule = registry.info(args.model).resolve(
            args.solver, args.steps, args.schedule
        )
    problems = []
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        problems.append(f"--steps must be in 1..{MAX_STEPS}")
    if not 0 <= args.seed <= SEED_MAX:
        problems.append(f"--seed must be in 0..{SEED_MAX}")
    if args.n < 1 or args.batch < 1:
        problems.append("-n and --batch must be at least 1")
    if args.model not in registry.models:
        problems.append(
            f"unknown model {args.model!r} in {registry.root}; known: {', '.join(registry.names()) or 'none'}"
        )
    if problems:
        print("arcdiff generate: " + "; ".join(problems), file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    amp = resolve_speed(device, args.amp).amp
    loaded = registry.load(args.model, device=device, amp_dtype=AMP_DTYPES[amp])
    t0 = time.perf_counter()
    chunks = []
    with torch.inference_mode():
        for start in range(0, args.n, args.batch):
            gens = [image_generator(image_seed(args.seed, k)) for k in range(start, min(args.n, start + args.batch))]
            x_T = torch.stack([initial_noise(loaded.image_shape, g) for g in gens]).to(device)
            x0 = sample(loaded.denoiser, x_T, args.steps, args.solver, generator=gens, schedule=args.schedule)
            chunks.append(to_uint8(x0, loaded.config.get("data_range", [-1.0, 1.0])))
    pixels = torch.cat(chunks)
    with open(args.out, "wb") as f:
        f.write(png_bytes(grid(pixels, args.nrow)))
    print(
        f"wrote {args.out}: {args.n} images of {args.model} ({'x'.join(map(str, loaded.image_shape))}), "
        f"{args.solver} {args.steps} steps ({args.schedule}) = {nfe(args.solver, args.steps)} NFE each, seeds "
        f"{image_seed(args.seed, 0)}..{image_seed(args.seed, args.n - 1)}, {time.perf_counter() - t0:.2f} s on {device}"
    )
    return 0


def pil_pixels(images: list):
    """PIL images -> uint8 (B, C, H, W), for model.images.grid (no torch in the remote path)."""
    import numpy as np

    arrays = [np.asarray(im) for im in images]
    return np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays])


def run_remote(args: argparse.Namespace) -> int:
    """`--url`: the same grid, made from the service's images (no torch in this process), with a
    progress bar fed by the generation's event stream."""
    from tqdm import tqdm

    from arcdiff.client import ArcdiffError, Client, GenerationEvent

    if args.n < 1:
        print("arcdiff generate: -n must be at least 1", file=sys.stderr)
        return 2
    what = f"{args.solver or 'default solver'} {args.steps or 'default'} steps"
    bar = tqdm(desc=f"{args.model} {what}", unit="NFE", file=sys.stderr, leave=True)

    def on_event(ev: GenerationEvent) -> None:
        if ev.event == "progress":
            bar.total = ev.data["nfe_total"]
            bar.update(ev.data["nfe_done"] - bar.n)
            bar.set_postfix(images=f"{ev.data['images_done']}/{args.n}", refresh=False)

    try:
        with Client(args.url, api_key=args.api_key) as client:
            result = client.generate(
                args.model,
                args.steps,
                args.solver,
                seed=args.seed,
                n=args.n,
                timeout=args.timeout,
                schedule=args.schedule,
                on_event=on_event,
                priority=args.priority,
            )
    except ArcdiffError as e:
        bar.close()
        print(f"arcdiff generate: {args.url}: {e}", file=sys.stderr)
        return 1
    bar.close()
    from arcdiff.model.images import grid, png_bytes

    with open(args.out, "wb") as f:
        f.write(png_bytes(grid(pil_pixels(result.pil_images), args.nrow)))
    m = result.metrics
    print(
        f"wrote {args.out}: {result.n} images of {result.model} from {args.url}, {result.solver} {result.steps} "
        f"steps ({result.schedule}) = {result.nfe} NFE each, seeds {result.seeds[0]}..{result.seeds[-1]}; queue "
        f"{m.get('queue_ms', 0):.0f} ms, sampling {m.get('sample_ms', 0):.0f} ms, encoding "
        f"{m.get('encode_ms', 0):.0f} ms, total {m.get('total_ms', 0):.0f} ms on {m.get('device', '?')}"
        + (f" ({result.retries} retries)" if result.retries else "")
    )
    return 0
