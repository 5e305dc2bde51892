"""Sampler comparisons that no single draw decides: disjoint sample sets, paired noise, two judges.

    arcdiff eval sets --ref MNIST_DIR --cells mnist:dpmpp2m_sde@10,mnist:unipc2@10,mnist:rk4@80 \\
        --sets 5 --set-size 1000 --seed 1000000 --features mnist,judge --out eval/sets

A cell is `model:solver[:schedule]@nfe[+bf16]` (schedule: the solver's own grid when left out;
+bf16: the network under bf16 autocast, the solver in float32, as a CPU worker with native bf16
runs it). Image k of every cell starts from the noise of seed (SEED + k), exactly as a request
with that seed would, so set i of one cell and set i of another are paired: same initial noise,
image for image. Set i holds images i*SET_SIZE .. (i+1)*SET_SIZE - 1.

The real images are split once by a fixed permutation: the first half is the reference every
Frechet distance (FD) is measured against; the second half gives SETS disjoint real sets of
SET_SIZE, whose FD to the reference is the floor (a perfect sampler's score at this size).

Each feature space scores every set: the mean FD over the sets, its standard deviation and range,
the share of confidently classified digits; and for each cell the paired difference to
--baseline (mean and standard deviation of the per-set differences, and in how many sets the cell
scored lower). Samples are stored as uint8 safetensors in OUT/samples/ (a rerun samples nothing it
already has; a new feature space costs only features). Writes OUT/sets.json, OUT/sets.md and
OUT/sets.png (mean FD against NFE with the spread as error bars, one panel per feature space).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arcdiff.eval.entry import module_main

DEFAULT_FEATURES = ("mnist", "judge")
SPLIT_SEED = 0  # the fixed permutation of the real images into reference and floor halves


@dataclass(frozen=True)
class Cell:
    model: str
    solver: str
    schedule: str
    nfe: int
    amp: str = "none"  # none or bf16

    @property
    def steps(self) -> int:
        from arcdiff.model.solver_names import SOLVER_INFO

        return self.nfe // SOLVER_INFO[self.solver].nfe_per_step

    @property
    def label(self) -> str:
        return f"{self.model} {self.solver}/{self.schedule} @{self.nfe}" + (" bf16" if self.amp != "none" else "")

    def key(self, seed: int, count: int) -> str:
        return f"{self.model}-{self.solver}-{self.schedule}-{self.nfe}nfe-{self.amp}-s{seed}-n{count}"


def parse_cell(spec: str) -> Cell:
    """'model:solver[:schedule]@nfe[+bf16]' -> Cell; the NFE must be a whole number of steps."""
    from arcdiff.model.solver_names import SOLVER_INFO

    body, plus, amp = spec.strip().partition("+")
    if plus and amp != "bf16":
        raise ValueError(f"cell {spec!r}: the only suffix is +bf16")
    row, at, nfe_text = body.partition("@")
    parts = row.split(":")
    if not at or len(parts) not in (2, 3) or not nfe_text.isdigit():
        raise ValueError(f"a cell is model:solver[:schedule]@nfe[+bf16], got {spec!r}")
    solver = parts[1]
    info = SOLVER_INFO.get(solver)
    if info is None:
        raise ValueError(f"cell {spec!r}: unknown solver {solver!r}; known: {', '.join(SOLVER_INFO)}")
    nfe = int(nfe_text)
    if nfe < info.nfe_per_step or nfe % info.nfe_per_step:
        raise ValueError(f"cell {spec!r}: {solver} costs {info.nfe_per_step} NFE per step, {nfe} is not a multiple")
    schedule = parts[2] if len(parts) == 3 else info.default_grid
    return Cell(parts[0], solver, schedule, nfe, "bf16" if plus else "none")


def split_real(images: Any, sets: int, set_size: int) -> tuple[Any, list[Any]]:
    """(reference half, `sets` disjoint floor sets from the other half) of the real images."""
    import torch

    n = images.shape[0]
    half = n // 2
    if sets * set_size > n - half:
        raise ValueError(
            f"{sets} floor sets of {set_size} need {sets * set_size} real images in the second half; "
            f"{n} real images give {n - half}: lower --sets or --set-size"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    floor = [images[perm[half + i * set_size : half + (i + 1) * set_size]] for i in range(sets)]
    return images[perm[:half]], floor


def cell_samples(
    cell: Cell, seed: int, count: int, out: Path, *, model_dir: str | None, batch: int, device: str, progress: bool
) -> Any:
    """The cell's `count` samples (uint8), from OUT/samples when there, else sampled and stored."""
    import torch
    from safetensors.torch import load_file, save_file

    from arcdiff.eval.evaluate import generate_samples
    from arcdiff.model.registry import ModelRegistry

    path = out / "samples" / f"{cell.key(seed, count)}.safetensors"
    if path.is_file():
        return load_file(str(path))["samples"]
    amp_dtype = torch.bfloat16 if cell.amp == "bf16" else None
    loaded = ModelRegistry(model_dir).load(cell.model, device=device, amp_dtype=amp_dtype)
    with torch.inference_mode():
        x = generate_samples(
            loaded,
            cell.solver,
            cell.steps,
            count,
            seed=seed,
            batch=batch,
            device=device,
            progress=progress,
            schedule=cell.schedule,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"samples": x.contiguous()}, str(tmp), metadata={"cell": cell.label, "seed": str(seed)})
    tmp.replace(path)
    return x


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def score_sets(samples: Any, extractor: Any, ref_stats: Any, sets: int, set_size: int) -> dict[str, Any]:
    """FD of each disjoint set against the reference statistics, and the confident-digit share."""
    from arcdiff.eval.evaluate import CONFIDENT
    from arcdiff.eval.features import extract
    from arcdiff.eval.metrics import frechet_distance_stats, gaussian_stats

    pooled, _ = extract(extractor, samples)
    fds = [
        frechet_distance_stats(ref_stats, gaussian_stats(pooled[i * set_size : (i + 1) * set_size]))
        for i in range(sets)
    ]
    out: dict[str, Any] = {"fd": fds, **summary(fds)}
    probabilities = getattr(extractor, "probabilities", None)
    if probabilities is not None:
        confident = (probabilities(samples).max(1).values > CONFIDENT).float()
        out["confident"] = [float(confident[i * set_size : (i + 1) * set_size].mean()) for i in range(sets)]
    return out


def paired(cell: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Per-set differences cell - baseline (same noise in each set): negative is better."""
    d = [a - b for a, b in zip(cell["fd"], base["fd"], strict=True)]
    return {**summary(d), "lower_in": sum(x < 0 for x in d), "sets": len(d)}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Mean Frechet distance over {result['sets']} disjoint sets of {result['set_size']} samples "
        f"(seeds {result['seed']} to {result['seed'] + result['sets'] * result['set_size'] - 1}; set i of every cell "
        "starts from the same noise) against half of the real images; sd and range over the sets. "
        "Paired: the per-set difference to the baseline (negative is better) and in how many sets the cell "
        "scored lower.",
        "",
        f"`{result['command']}`",
        "",
    ]
    for feat, floor in result["floor"].items():
        lines += [
            f"**{feat}** (real-vs-real floor at this size: {floor['mean']:.2f} ± {floor['sd']:.2f})",
            "",
            "| cell | NFE | FD mean ± sd | range | confident | vs " + result["baseline"] + " | lower in |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in result["cells"]:
            s = c["scores"][feat]
            conf = f"{statistics.fmean(s['confident']):.3f}" if "confident" in s else "-"
            p = c["paired"].get(feat)
            vs = f"{p['mean']:+.2f} ± {p['sd']:.2f}" if p else "-"
            lower = f"{p['lower_in']}/{p['sets']}" if p else "-"
            lines.append(
                f"| {c['label']} | {c['nfe']} | {s['mean']:.2f} ± {s['sd']:.2f} | {s['min']:.2f}-{s['max']:.2f} "
                f"| {conf} | {vs} | {lower} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Mean FD against NFE (log x) with the sd as error bars, one panel per feature space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    feats = list(result["floor"])
    fig, axes = plt.subplots(1, len(feats), figsize=(6.5 * len(feats), 4.8), squeeze=False)
    cells = result["cells"]
    for ax, feat in zip(axes[0], feats, strict=True):
        for c in cells:
            s = c["scores"].get(feat)
            if s is None:
                continue
            marker = "s" if c.get("model", "").endswith("step") else "o"
            # cells at one NFE side by side: a small offset on the log axis keeps their bars apart
            peers = [d["label"] for d in cells if d["nfe"] == c["nfe"]]
            x = c["nfe"] * 1.03 ** (peers.index(c["label"]) - (len(peers) - 1) / 2)
            ax.errorbar(x, s["mean"], yerr=s["sd"], fmt=marker, capsize=3, label=c["label"])
        floor = result["floor"][feat]
        ax.axhline(floor["mean"], color="grey", lw=1, ls=":", label=f"real data ({floor['mean']:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")  # a 1-NFE teacher and a good sampler differ a hundredfold
        ticks = sorted({c["nfe"] for c in cells})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations per image (NFE)")
        ax.set_ylabel(f"FD, {feat} features (lower is better)")
        ax.set_title(f"{feat}: mean ± sd over {result['sets']} sets of {result['set_size']}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sets(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from arcdiff.eval.features import extract, get_extractor
    from arcdiff.eval.metrics import frechet_distance_stats, gaussian_stats
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.training.data import load_images

    cells = [parse_cell(s) for s in args.cells.split(",") if s.strip()]
    baseline = parse_cell(args.baseline) if args.baseline else cells[0]
    if baseline not in cells:
        cells.insert(0, baseline)
    registry = ModelRegistry(args.model_dir)
    unknown = sorted({c.model for c in cells} - set(registry.models))
    if unknown:
        raise ValueError(
            f"unknown model(s) {', '.join(unknown)} in {registry.root}; known: {', '.join(registry.names())}"
        )
    shapes = {(registry.info(cell.model).channels, registry.info(cell.model).image_size) for cell in cells}
    if len(shapes) != 1:
        raise ValueError(f"the cells' models differ in shape {sorted(shapes)}: compare models of one size")
    ((c, size),) = shapes
    count = args.sets * args.set_size
    reference, floor_sets = split_real(load_images(args.ref, size, c), args.sets, args.set_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = {}
    for cell in cells:
        t0 = time.perf_counter()
        samples[cell] = cell_samples(
            cell,
            args.seed,
            count,
            out,
            model_dir=args.model_dir,
            batch=args.batch,
            device=args.device,
            progress=not args.quiet,
        )
        if not args.quiet:
            print(f"{cell.label}: {count} samples ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    result: dict[str, Any] = {
        "command": command,
        "seed": args.seed,
        "sets": args.sets,
        "set_size": args.set_size,
        "baseline": baseline.label,
        "floor": {},
        "extractors": {},
        "cells": [
            {
                "label": cell.label,
                "model": cell.model,
                "solver": cell.solver,
                "schedule": cell.schedule,
                "nfe": cell.nfe,
                "steps": cell.steps,
                "amp": cell.amp,
                "scores": {},
                "paired": {},
            }
            for cell in cells
        ],
    }
    for feat in args.features.split(","):
        extractor = get_extractor(feat, c, device=args.device)
        ref_pooled, _ = extract(extractor, reference)
        ref_stats = gaussian_stats(ref_pooled)
        result["extractors"][feat] = extractor.id
        floor = [frechet_distance_stats(ref_stats, gaussian_stats(extract(extractor, s)[0])) for s in floor_sets]
        result["floor"][feat] = {"fd": floor, **summary(floor)}
        for cell, rec in zip(cells, result["cells"], strict=True):
            rec["scores"][feat] = score_sets(samples[cell], extractor, ref_stats, args.sets, args.set_size)
        base = result["cells"][cells.index(baseline)]["scores"][feat]
        for cell, rec in zip(cells, result["cells"], strict=True):
            if cell != baseline:
                rec["paired"][feat] = paired(rec["scores"][feat], base)
        del extractor
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, on its own parser (`python -m arcdiff.eval.sets`) or on `arcdiff eval sets`."""
    p.add_argument("--ref", required=True, help="real images: the MNIST IDX folder (or any load_images source)")
    p.add_argument("--cells", required=True, help="comma-separated cells, model:solver[:schedule]@nfe[+bf16]")
    p.add_argument("--baseline", help="the cell every other is paired against (default: the first)")
    p.add_argument("--sets", type=int, default=5, help="disjoint sample sets per cell (default 5)")
    p.add_argument("--set-size", type=int, default=1000, help="samples per set (default 1000)")
    p.add_argument("--seed", type=int, default=1_000_000, help="seed of image 0 (default 1000000)")
    p.add_argument(
        "--features",
        default=",".join(DEFAULT_FEATURES),
        help="comma-separated feature spaces: mnist (the project's CNN), judge (an MLP the samplers were never "
        "chosen on), inception (default mnist,judge)",
    )
    p.add_argument("--out", default="eval/sets", help="output folder (default eval/sets)")
    p.add_argument("--model-dir", help="models folder (default ARCDIFF_MODEL_DIR or the bundled models)")
    p.add_argument("--batch", type=int, default=250, help="images per sampling batch (does not change the samples)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    return module_main("arcdiff eval sets", __doc__, add_arguments, run, argv)


def shown_command(argv: list[str], args: argparse.Namespace) -> list[str]:
    """The arguments as the results record them: this machine's folders read MNIST_DIR, MODEL_DIR and OUT."""
    names = {args.ref: "MNIST_DIR", args.out: "OUT", **({args.model_dir: "MODEL_DIR"} if args.model_dir else {})}
    return [names.get(a, a) if Path(a).is_absolute() else a for a in argv]


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Sample what is missing, score every cell in every feature space, write the table;
    `argv`, the command's own arguments, is recorded with the results."""
    import shlex

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_sets(args, "arcdiff eval sets " + shlex.join(shown_command(argv, args)))
    except (ValueError, OSError) as e:
        print(f"arcdiff eval sets: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "sets.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "sets.md").write_text(markdown(result) + "\n")
    plot(result, out / "sets.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
