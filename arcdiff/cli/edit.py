"""`arcdiff edit`: image-to-image and inpainting of one PNG, locally or through a service (`--url`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

HELP = """Vary an image (image-to-image) or fill in part of it (inpainting), and write N results as one grid PNG.

--strength S in (0, 1] sets how far the image may move: the edit noises the input to the grid point
that leaves floor(S x steps) steps (S = 1: from pure noise; then only a mask keeps anything of the
input) and runs the solver from there, so it costs only those steps. With --mask (a
greyscale PNG of the image's size; white = regenerate, black = keep) the kept pixels are put back
into the model's x0 estimate at every step and come back exactly. Result k uses seed (SEED + k):
the same image the API returns for that request. With --url the results come from a running
service (arcdiff.client) instead of local sampling."""


def common(p: argparse.ArgumentParser) -> None:
    """The flags `edit` and `interpolate` share with `generate`."""
    from arcdiff.contract import MAX_STEPS, SCHEDULE_NAMES, SOLVER_NAMES

    p.add_argument("--model", required=True, metavar="NAME", help="model name (see ARCDIFF_MODEL_DIR)")
    p.add_argument("--steps", type=int, metavar="N", help=f"solver steps, 1..{MAX_STEPS}")
    p.add_argument("--solver", choices=SOLVER_NAMES, metavar="SOLVER", help=f"one of {', '.join(SOLVER_NAMES)}")
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, help="time grid (default: the solver's own)")
    p.add_argument("-o", "--out", required=True, metavar="FILE.png", help="output grid PNG")
    p.add_argument("--nrow", type=int, metavar="N", help="images per grid row (default: square)")
    p.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N (default auto)")
    p.add_argument("--model-dir", metavar="DIR", help="folder of model folders (default ARCDIFF_MODEL_DIR or bundled)")
    p.add_argument("--url", metavar="URL", help="ask the service at URL instead of sampling locally")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("ARCDIFF_API_KEY") or None,
        help="with --url: the service's API key (default ARCDIFF_API_KEY)",
    )
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="with --url: seconds to wait (600)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="image-to-image or inpainting of a PNG", description=HELP)
    common(p)
    p.add_argument("--image", required=True, type=Path, metavar="IN.png", help="the image to edit (the model's size)")
    p.add_argument("--strength", type=float, default=None, metavar="S", help="in (0, 1]; default 1 (0.5 with no mask)")
    p.add_argument("--mask", type=Path, metavar="MASK.png", help="inpainting mask: white = regenerate, black = keep")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="seed of result 0 (default 0)")
    p.add_argument("-n", type=int, default=4, metavar="COUNT", help="number of results (default 4)")
    p.set_defaults(func=run)


def local_model(args: argparse.Namespace, what: str) -> tuple[Any, Any] | None:
    """(registry, loaded model) with the request's defaults filled in as the API fills them, or None."""
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.worker.loading import resolve_device

    registry = ModelRegistry(args.model_dir)
    if args.model not in registry.models:
        print(f"arcdiff {what}: unknown model {args.model!r}; known: {', '.join(registry.names())}", file=sys.stderr)
        return None
    args.solver, args.steps, args.schedule = registry.info(args.model).resolve(args.solver, args.steps, args.schedule)
    args.device = resolve_device(args.device)
    return registry, registry.load(args.model, device=args.device)


def read_png(path: Path, loaded: Any, what: str) -> Any:
    """A PNG file checked as the API checks it -> floats in the model's data range (1, C, H, W)."""
    import base64

    import torch

    from arcdiff.contract import decode_png

    arr = decode_png(base64.b64encode(path.read_bytes()).decode(), loaded.image_shape, what, f"model {loaded.name}")
    lo, hi = loaded.config.get("data_range", [-1.0, 1.0])
    return torch.tensor(arr, dtype=torch.float32)[None] * ((hi - lo) / 255.0) + lo


def write_grid(args: argparse.Namespace, pixels: Any) -> None:
    from arcdiff.model.images import grid, png_bytes

    with open(args.out, "wb") as f:
        f.write(png_bytes(grid(pixels, args.nrow)))


def run(args: argparse.Namespace) -> int:
    from arcdiff.contract import SpecError

    strength = args.strength if args.strength is not None else (1.0 if args.mask else 0.5)
    if not 0 < strength <= 1 or args.n < 1:
        print("arcdiff edit: --strength must be in (0, 1] and -n at least 1", file=sys.stderr)
        return 2
    if args.url:
        return run_remote(args, strength)
    import torch

    from arcdiff.model import editing
    from arcdiff.model.images import to_uint8
    from arcdiff.model.rng import image_generator, image_seed, initial_noise
    from arcdiff.model.solver_names import edit_steps
    from arcdiff.model.solvers import nfe

    found = local_model(args, "edit")
    if found is None:
        return 2
    _, loaded = found
    try:
        x0_in = read_png(args.image, loaded, "image")
        mask = (read_png(args.mask, loaded, "mask") + 1) / 2 if args.mask else None
    except SpecError as e:
        print(f"arcdiff edit: {e}", file=sys.stderr)
        return 2
    gens = [image_generator(image_seed(args.seed, k)) for k in range(args.n)]
    eps = torch.stack([initial_noise(loaded.image_shape, g) for g in gens])
    with torch.inference_mode():
        out = editing.edit(
            loaded.denoiser,
            x0_in.expand(args.n, -1, -1, -1).to(args.device),
            eps.to(args.device),
            args.steps,
            args.solver,
            strength,
            mask=None if mask is None else mask.to(args.device),
            schedule=args.schedule,
            generator=gens,
        )
    write_grid(args, to_uint8(out, loaded.config.get("data_range", [-1.0, 1.0])))
    k = edit_steps(args.steps, strength)
    print(
        f"wrote {args.out}: {args.n} {'inpaintings' if args.mask else 'edits'} of {args.image} at strength "
        f"{strength:g}: the last {k} of {args.steps} {args.solver} steps ({args.schedule}) = "
        f"{nfe(args.solver, k)} NFE each"
    )
    return 0


def run_remote(args: argparse.Namespace, strength: float) -> int:
    from arcdiff.cli.generate import pil_pixels
    from arcdiff.client import ArcdiffError, Client, Edit

    edit = Edit(image=args.image.read_bytes(), strength=strength, mask=args.mask.read_bytes() if args.mask else None)
    try:
        with Client(args.url, api_key=args.api_key) as client:
            result = client.generate(
                args.model, args.steps, args.solver, seed=args.seed, n=args.n, timeout=args.timeout,
                schedule=args.schedule, edit=edit,
            )  # fmt: skip
    except ArcdiffError as e:
        print(f"arcdiff edit: {args.url}: {e}", file=sys.stderr)
        return 1
    write_grid(args, pil_pixels(result.pil_images))
    print(f"wrote {args.out}: {result.n} edits from {args.url}, {result.solver}, {result.nfe} NFE each")
    return 0
