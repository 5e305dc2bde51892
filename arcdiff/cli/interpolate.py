"""`arcdiff interpolate`: a strip of frames between two seeds or two images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arcdiff.cli.edit import common, local_model, read_png, write_grid

HELP = """Decode K latents along the great circle (slerp) between two ends and write them as one strip PNG.

The ends are the start noise of two seeds (--seeds A B: the first and last frames are those seeds'
generations) or the encodings of two images (--images A.png B.png: the ODE run from the image up
to noise, so the ends come back as the images, up to the round-trip error; needs a solver that
runs backwards: ddim, euler, heun, rk4). A deterministic solver is required (default heun, 30 steps:
the encodings' measured default)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("interpolate", help="frames between two seeds or two images", description=HELP)
    common(p)
    ends = p.add_mutually_exclusive_group(required=True)
    ends.add_argument("--seeds", type=int, nargs=2, metavar=("A", "B"), help="two seeds")
    ends.add_argument("--images", type=Path, nargs=2, metavar=("A.png", "B.png"), help="two images, encoded first")
    p.add_argument("-k", "--frames", type=int, default=8, metavar="K", help="frames, ends included (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from arcdiff.contract import SpecError
    from arcdiff.model.solver_names import DEFAULT_ENCODE_SOLVER, DEFAULT_ENCODE_STEPS

    args.solver = args.solver or DEFAULT_ENCODE_SOLVER
    args.steps = args.steps or DEFAULT_ENCODE_STEPS
    args.schedule = args.schedule or "uniform"
    from arcdiff.model.solver_names import SOLVER_INFO

    if args.frames < 2 or SOLVER_INFO[args.solver].stochastic:
        print("arcdiff interpolate: --frames must be at least 2 and the solver deterministic", file=sys.stderr)
        return 2
    if args.url:
        return run_remote(args)
    import torch

    from arcdiff.model import editing
    from arcdiff.model.images import to_uint8
    from arcdiff.model.rng import image_generator, initial_noise

    found = local_model(args, "interpolate")
    if found is None:
        return 2
    _, loaded = found
    try:
        with torch.inference_mode():
            if args.seeds:
                z0, z1 = (initial_noise(loaded.image_shape, image_generator(s)).to(args.device) for s in args.seeds)
            else:
                x = torch.cat([read_png(p, loaded, "image") for p in args.images]).to(args.device)
                z0, z1 = editing.encode(loaded.denoiser, x, args.steps, args.solver, args.schedule)
            out = editing.interpolate(loaded.denoiser, z0, z1, args.frames, args.steps, args.solver, args.schedule)
    except (SpecError, ValueError) as e:
        print(f"arcdiff interpolate: {e}", file=sys.stderr)
        return 2
    args.nrow = args.nrow or args.frames
    write_grid(args, to_uint8(out, loaded.config.get("data_range", [-1.0, 1.0])))
    print(f"wrote {args.out}: {args.frames} frames, {args.solver} {args.steps} steps ({args.schedule})")
    return 0


def run_remote(args: argparse.Namespace) -> int:
    from arcdiff.cli.generate import pil_pixels
    from arcdiff.client import ArcdiffError, Client

    ends = list(args.seeds) if args.seeds else [p.read_bytes() for p in args.images]
    try:
        with Client(args.url, api_key=args.api_key) as client:
            result = client.interpolate(
                args.model, ends[0], ends[1], args.frames, args.steps, args.solver, schedule=args.schedule,
                timeout=args.timeout,
            )  # fmt: skip
    except ArcdiffError as e:
        print(f"arcdiff interpolate: {args.url}: {e}", file=sys.stderr)
        return 1
    args.nrow = args.nrow or args.frames
    write_grid(args, pil_pixels(result.pil_images))
    print(f"wrote {args.out}: {result.n} frames from {args.url}, {result.solver}, {result.nfe} NFE each")
    return 0
