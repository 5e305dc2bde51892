"""The evaluation table (docs/evaluation.md): FID, sFID and precision/recall against NFE for the bundled MNIST models.

    python -m arcdiff.model.eval.table --ref MNIST_DIR --num-samples 500 --out eval/table

Rows: `mnist` with euler, heun, rk4, ddim, dpmpp2m and `mnist-eps` with ddim and rk4; columns:
NFE 8, 20, 40, 80 (rk4 at 2/5/10/20 steps, heun at 4/10/20/40, the one-evaluation solvers at
8/20/40/80). Every eval uses the same seeds, so all cells start from the same noise. Each eval's
record lands in OUT/records/; a rerun skips the cells whose record exists (--force redoes them).
Writes OUT/table.md and OUT/table.json, and OUT/mnist-rk4-10steps.png (the sample grid in docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

NFES = (8, 20, 40, 80)
ROWS: tuple[tuple[str, str], ...] = (
    ("mnist", "euler"),
    ("mnist", "heun"),
    ("mnist", "rk4"),
    ("mnist", "ddim"),
    ("mnist", "dpmpp2m"),
    ("mnist-eps", "ddim"),
    ("mnist-eps", "rk4"),
)
DEFAULT_SAMPLES = 500  # README, evaluation section: ~36 min on 1 CPU thread, ~20-25 min on 2, for all 28 cells


def cells(rows: tuple[tuple[str, str], ...] = ROWS, nfes: tuple[int, ...] = NFES) -> list[tuple[str, str, int]]:
    """(model, solver, steps) for every cell whose NFE is a whole number of steps."""
    from arcdiff.model.solvers import get_solver

    out = []
    for model, solver in rows:
        per = get_solver(solver).nfe_per_step
        out += [(model, solver, n // per) for n in nfes if n % per == 0]
    return out


def shown_path(path: str) -> str:
    """A path as the table prints it: an absolute one belongs to the machine that ran it, so it reads MNIST_DIR."""
    return "MNIST_DIR" if Path(path).is_absolute() else path


def _pivot(records: list[dict[str, Any]], fmt, title: str, nfes: tuple[int, ...]) -> list[str]:
    by = {(r["model"], r["solver"], r["nfe"]): r for r in records}
    rows = list(dict.fromkeys((r["model"], r["solver"]) for r in records))
    lines = [
        f"**{title}**",
        "",
        "| model | solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in nfes) + " |",
    ]
    for m, s in rows:
        lines.append(
            f"| {m} | {s} | " + " | ".join(fmt(by[(m, s, n)]) if (m, s, n) in by else "-" for n in nfes) + " |"
        )
    return lines + [""]


def markdown(records: list[dict[str, Any]], command: str, nfes: tuple[int, ...] = NFES) -> str:
    r0 = records[0]
    f = r0["floor"]
    head = [
        f"FID, sFID and precision/recall (k = {r0['k_neighbours']}) of {r0['num_samples']} samples per cell "
        f"against the {r0['ref_images']} images of `{shown_path(r0['ref'])}`, features from `{r0['extractor']}`; "
        f"precision/recall against a random {r0['pr_ref_images']} of them.",
        "",
        f"Floor (two random halves of the real data, {f['n_half']} images each): FID {f['fid']:.2f}, "
        f"sFID {f['sfid']:.2f}, precision {f['precision']:.3f}, recall {f['recall']:.3f}."
        + (
            f" FID of {r0['num_samples']} real images against the rest: {r0['floor_fid_at_k']:.2f} "
            f"(sFID {r0['floor_sfid_at_k']:.2f}), about what a perfect model scores with this many samples."
            if r0.get("floor_fid_at_k") is not None
            else ""
        ),
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    body = (
        _pivot(records, lambda r: f"{r['fid']:.2f}", "FID (lower is better)", nfes)
        + _pivot(
            records,
            lambda r: f"{r['precision']:.2f} / {r['recall']:.2f}",
            "precision / recall (higher is better)",
            nfes,
        )
        + _pivot(records, lambda r: f"{r['sfid']:.2f}", "sFID (lower is better)", nfes)
        + _pivot(
            records,
            lambda r: f"{r['confident_fraction']:.0%}" if r.get("confident_fraction") is not None else "-",
            "samples the classifier calls a digit with confidence > 0.9",
            nfes,
        )
    )
    secs = sum(r["wall_seconds"] for r in records)
    tail = [
        f"{len(records)} evals, {secs / 60:.1f} min of eval time "
        f"({r0['threads']} thread(s) on {r0['device']}, batch {r0['batch']})."
    ]
    return "\n".join(head + body + tail) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m arcdiff.model.eval.table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ref", required=True, help="real images (the MNIST IDX folder)")
    p.add_argument("--num-samples", type=int, default=DEFAULT_SAMPLES, help="samples per cell")
    p.add_argument("--out", default="eval/table", help="output folder")
    p.add_argument("--model-dir", default=None, help="models folder (default: ARCDIFF_MODEL_DIR or the bundled models)")
    p.add_argument("--models", default="", help="comma-separated model names to keep (default: all rows)")
    p.add_argument(
        "--rename", default="", help="NAME=ROWNAME,...: evaluate NAME in place of ROWNAME (e.g. a test model)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128, help="images per sampling batch")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=None, help="reference-feature cache folder")
    p.add_argument("--force", action="store_true", help="redo cells whose record exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--existing-only",
        action="store_true",
        help="write the table from the records already in OUT/records, running nothing (missing cells: -)",
    )
    args = p.parse_args(argv)

    import torch

    from arcdiff.model.eval.evaluate import evaluate, write_record
    from arcdiff.model.eval.features import get_extractor
    from arcdiff.model.eval.reference import reference_features
    from arcdiff.model.images import save_grid
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.model.solvers import nfe

    if args.threads:
        torch.set_num_threads(args.threads)
    # --rename mnist-tiny=mnist runs the model "mnist-tiny" in the rows of "mnist"
    alias = {row: name for name, row in (kv.split("=", 1) for kv in args.rename.split(",") if kv)}
    keep = set(filter(None, args.models.split(",")))
    todo = [c for c in cells() if not keep or c[0] in keep]
    registry = ModelRegistry(args.model_dir)
    loaded = {m: registry.load(alias.get(m, m), device=args.device) for m in dict.fromkeys(c[0] for c in todo)}
    first = next(iter(loaded.values()))
    ch, size, _ = first.image_shape
    extractor = get_extractor("auto", ch, device=args.device)
    reference = reference_features(args.ref, size, ch, extractor, cache_dir=args.cache_dir, progress=not args.quiet)

    out = Path(args.out)
    records_dir = out / "records"
    records = []
    t0 = time.time()
    left = sum(nfe(sv, st) for _, sv, st in todo) * args.num_samples  # image-evaluations still to run
    rate: list[float] = []  # seconds per image-evaluation, measured
    for i, (m, solver, steps) in enumerate(todo):
        stem = f"{m}-{solver}-{steps}steps-k{args.num_samples}-seed{args.seed}"
        path = records_dir / f"{stem}.json"
        rec = json.loads(path.read_text()) if path.is_file() and not args.force else None
        if rec is not None and (rec.get("ref"), rec.get("extractor")) == (str(args.ref), extractor.id):
            left -= args.num_samples * nfe(solver, steps)
            print(f"[{i + 1}/{len(todo)}] {stem}: kept the existing record", flush=True)
        elif args.existing_only:
            print(f"[{i + 1}/{len(todo)}] {stem}: no record, left out", flush=True)
            continue
        else:
            res = evaluate(
                loaded[m],
                solver,
                steps,
                args.num_samples,
                args.ref,
                seed=args.seed,
                batch=args.batch,
                extractor=extractor,
                reference=reference,
                device=args.device,
                progress=not args.quiet,
            )
            res.model = m  # the row's name, also under --rename
            write_record(res, records_dir)
            rec = res.to_json()
            rate.append(res.wall_seconds / (res.num_samples * res.nfe))
            left -= res.num_samples * res.nfe
            eta = left * sum(rate) / len(rate) / 60
            print(f"[{i + 1}/{len(todo)}] {res.line()}  (about {eta:.0f} min left)", flush=True)
            if (m, solver, steps) == ("mnist", "rk4", 10) and res.grid is not None:
                save_grid(res.grid, out / "mnist-rk4-10steps.png", scale=2)
        records.append(rec)
    command = "python -m arcdiff.model.eval.table " + " ".join(
        shown_path(a) if a == args.ref else a
        for a in (argv if argv is not None else sys.argv[1:])
        if a != "--existing-only"
    )
    (out / "table.json").write_text(json.dumps({"command": command, "records": records}, indent=2) + "\n")
    (out / "table.md").write_text(markdown(records, command))
    print(f"{len(todo)} cells in {(time.time() - t0) / 60:.1f} min; wrote {out / 'table.md'} and {out / 'table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
