"""Editing measured on real MNIST test digits: the encode-then-decode round trip, and inpainting.

    arcdiff eval editing --data MNIST_DIR/t10k-images-idx3-ubyte.gz --images 32 --out eval/editing

Round trip: each digit is encoded (the ODE from eta = 0 up to pi/2, model/editing.encode) and the
latent decoded again with the same solver, steps and grid; the table gives the RMS difference of
the decoded PNG from the original in grey levels (0-255, after rounding to pixels), per solver and
step count, and the fewest steps (of those measured) where it falls below 0.5 and below 2 grey
levels.

Inpainting: the bottom half, then the right half, of each digit is masked and refilled from pure
noise (strength 1, its own seed) with the known half put back into x0_hat at every step. The
project's digit classifier (eval/mnist_net.py, the `mnist` features) judges the originals and the
refills: the share classified confidently (top probability >= --confidence) and the share that
keeps the original's predicted label. Writes OUT/editing.md, OUT/editing.json and OUT/editing.png
(rows: originals, round trips at the largest step count, bottom and right refills, then an
interpolation between the first two digits' encodings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from arcdiff.eval.entry import module_main

STEPS = (5, 10, 20, 50, 100)
SOLVERS = ("ddim", "euler", "heun")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, on its own parser (`python -m arcdiff.eval.editing`) or on `arcdiff eval editing`."""
    p.add_argument("--data", required=True, help="MNIST test images: an IDX file or the folder holding it")
    p.add_argument("--model", default="mnist")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--images", type=int, default=32, help="test digits (the first N)")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="round trip: step counts")
    p.add_argument("--solvers", default=",".join(SOLVERS), help="round trip: deterministic one-step solvers")
    p.add_argument("--schedule", default="uniform", help="time grid of the round trip")
    p.add_argument("--inpaint-solver", default="heun")
    p.add_argument("--inpaint-steps", type=int, default=20)
    p.add_argument("--confidence", type=float, default=0.9, help="top class probability that counts as confident")
    p.add_argument("--frames", type=int, default=8, help="interpolation frames in the picture")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="eval/editing")


def main(argv: list[str] | None = None) -> int:
    return module_main("arcdiff eval editing", __doc__, add_arguments, run, argv)


def round_trip(den: Any, x0: Any, solvers: list[str], steps: list[int], schedule: str) -> list[dict[str, Any]]:
    """One row per (solver, steps): RMS and worst pixel in grey levels, NFE, seconds."""
    import torch

    from arcdiff.model import editing
    from arcdiff.model.images import to_uint8
    from arcdiff.model.solvers import nfe

    rows = []
    original = to_uint8(x0).double()
    for solver in solvers:
        for n in steps:
            t0 = time.perf_counter()
            with torch.inference_mode():
                back = editing.decode(den, editing.encode(den, x0, n, solver, schedule), n, solver, schedule)
            diff = to_uint8(back).double() - original
            rows.append(
                {
                    "solver": solver,
                    "steps": n,
                    "nfe": 2 * nfe(solver, n),
                    "rms_grey": round(float(diff.pow(2).flatten(1).mean(1).sqrt().mean()), 3),
                    "worst_image_rms_grey": round(float(diff.pow(2).flatten(1).mean(1).sqrt().max()), 3),
                    "max_grey": int(diff.abs().max()),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            print(f"round trip {solver} {n} steps: {rows[-1]['rms_grey']} grey levels RMS", file=sys.stderr)
    return rows


def first_below(rows: list[dict[str, Any]], solver: str, level: float) -> int | None:
    ok = [r["steps"] for r in rows if r["solver"] == solver and r["rms_grey"] < level]
    return min(ok) if ok else None


def inpainting(den: Any, x0: Any, solver: str, steps: int, confidence: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(figures, refilled batches by mask name)."""
    import torch

    from arcdiff.eval.mnist_net import load_mnist_extractor
    from arcdiff.model import editing
    from arcdiff.model.images import to_uint8
    from arcdiff.model.rng import image_generator, image_seed, initial_noise

    judge = load_mnist_extractor()
    b, _, h, w = x0.shape

    def judged(x: Any) -> tuple[Any, Any]:
        p = judge.probabilities(to_uint8(x))
        return p.max(1).values, p.argmax(1)

    conf0, label0 = judged(x0)
    out: dict[str, Any] = {"original_confident": round(float((conf0 >= confidence).double().mean()), 3)}
    refills = {}
    for name in ("bottom", "right"):
        mask = torch.zeros_like(x0)
        if name == "bottom":
            mask[:, :, h // 2 :] = 1
        else:
            mask[:, :, :, w // 2 :] = 1
        gens = [image_generator(image_seed(0, k)) for k in range(b)]
        eps = torch.stack([initial_noise(tuple(x0.shape[1:]), g) for g in gens])
        with torch.inference_mode():
            x = editing.edit(den, x0, eps, steps, solver, 1.0, mask=mask, generator=gens)
        conf, label = judged(x)
        out[f"{name}_confident"] = round(float((conf >= confidence).double().mean()), 3)
        out[f"{name}_same_label"] = round(float((label == label0).double().mean()), 3)
        refills[name] = x
        print(f"inpainting {name}: {out[f'{name}_confident']} confident", file=sys.stderr)
    return out, refills


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Measure and write the table; `argv`, the command's own arguments, is recorded as the command."""
    import torch

    from arcdiff.model import editing
    from arcdiff.model.images import save_grid, to_uint8
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.training.data import load_mnist

    torch.set_num_threads(max(1, args.threads))
    loaded = ModelRegistry(args.model_dir).load(args.model)
    den = loaded.denoiser
    digits, _ = load_mnist(args.data)
    x0 = digits[: args.images].float() / 127.5 - 1.0
    solvers = args.solvers.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    rows = round_trip(den, x0, solvers, steps, args.schedule)
    inpaint, refills = inpainting(den, x0, args.inpaint_solver, args.inpaint_steps, args.confidence)
    best = min(rows, key=lambda r: (r["rms_grey"], r["nfe"]))
    with torch.inference_mode():
        z = editing.encode(den, x0[:2], best["steps"], best["solver"], args.schedule)
        back = editing.decode(den, z, best["steps"], best["solver"], args.schedule)
        frames = editing.interpolate(den, z[0], z[1], args.frames, best["steps"], best["solver"], args.schedule)
    k = min(args.frames, x0.shape[0])
    first_row = [x0[:2], back, frames]
    rows_below = [x0[:k], refills["bottom"][:k], refills["right"][:k]]
    picture = torch.cat([to_uint8(x) for x in (*first_row, *rows_below)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # row 1: two originals, their round trips, the interpolation between them; then originals,
    # bottom refills, right refills
    save_grid(picture[: 4 + args.frames], out / "editing_interpolation.png", nrow=4 + args.frames, scale=3)
    save_grid(picture[4 + args.frames :], out / "editing.png", nrow=k, scale=3)
    below = {
        s: {"0.5": first_below(rows, s, 0.5), "2": first_below(rows, s, 2.0)} for s in solvers
    }  # fewest steps measured under each level
    record = {
        "command": "arcdiff eval editing " + " ".join(argv),
        "model": args.model,
        "images": int(x0.shape[0]),
        "schedule": args.schedule,
        "round_trip": rows,
        "first_below": below,
        "inpainting": {
            "solver": args.inpaint_solver,
            "steps": args.inpaint_steps,
            "confidence": args.confidence,
            **inpaint,
        },
    }
    (out / "editing.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"`{record['command']}` ({record['images']} MNIST test digits, model {args.model}, {args.schedule} grid)",
        "",
        "| solver | steps | NFE (encode + decode) | RMS (grey levels) | worst image RMS | max pixel |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['solver']} | {r['steps']} | {r['nfe']} | {r['rms_grey']} | {r['worst_image_rms_grey']} | "
            f"{r['max_grey']} |"
            for r in rows
        ),
        "",
        "Fewest steps measured with the RMS below 0.5 / 2 grey levels: "
        + "; ".join(f"{s}: {below[s]['0.5'] or '-'} / {below[s]['2'] or '-'}" for s in solvers),
        "",
        f"Inpainting ({args.inpaint_solver}, {args.inpaint_steps} steps, confident = top probability >= "
        f"{args.confidence}): originals {inpaint['original_confident']:.1%} confident; bottom half refilled "
        f"{inpaint['bottom_confident']:.1%} confident, {inpaint['bottom_same_label']:.1%} same label; right half "
        f"refilled {inpaint['right_confident']:.1%} confident, {inpaint['right_same_label']:.1%} same label.",
    ]
    (out / "editing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
