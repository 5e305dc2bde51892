"""The frontier: FID, sFID, precision/recall and confident-digit share against NFE per (solver,
time grid) for the bundled MNIST models, plotted as FID against NFE.

    arcdiff eval table --ref MNIST_DIR --num-samples 500 --out eval/table

Rows are (model, solver, schedule); columns NFE 5, 10, 20, 40 (and 80 for the paper's solvers
euler, heun, rk4); a cell exists where the NFE is a whole number of steps (rk4 at 20/40/80 is 5,
10, 20 steps). `--rows` and `--nfes` choose a subset (e.g. `--rows mnist:unipc2:karras@5/10,mnist:rk4@40/80`
or `--rows mnist:ddpm --nfes 20,200`). Every eval uses the same seeds, so all cells start from the same noise.
Each eval's record lands in OUT/records/; a rerun skips the cells whose record exists (--force
redoes them). Writes OUT/table.md, OUT/table.json, OUT/frontier.png (FID against NFE, log x, one
line per sampler and model; needs matplotlib, in the eval and dev extras) and
OUT/<model>-<default sampler>-<NFE>nfe.png sample grids of the default sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from arcdiff.eval.entry import module_main

NFES = (5, 10, 20, 40)
PAPER_NFES = (5, 10, 20, 40, 80)  # the paper's solvers get one more column
PAPER_SOLVERS = ("euler", "heun", "rk4")
SAMPLERS: tuple[tuple[str, str], ...] = (
    ("rk4", "uniform"),
    ("heun", "uniform"),
    ("euler", "uniform"),
    ("ddim", "uniform"),
    ("ddpm", "uniform"),
    ("dpmpp2m", "uniform"),
    ("dpmpp2m", "karras"),
    ("dpmpp3m", "karras"),
    ("unipc2", "karras"),
    ("unipc2", "logsnr"),
    ("unipc3", "karras"),
    ("dpmpp2m_sde", "karras"),
)
ROWS: tuple[tuple[str, str, str], ...] = tuple((m, s, g) for m in ("mnist", "mnist-eps") for s, g in SAMPLERS)
DEFAULT_SAMPLES = 500


def parse_rows(text: str) -> tuple[tuple, ...]:
    """'model:solver[:schedule][@nfe/nfe/...],...' -> rows (schedule default uniform; the NFEs,
    when given, replace --nfes for that row)."""
    rows: list[tuple] = []
    for item in filter(None, text.split(",")):
        spec, _, nfes = item.partition("@")
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"a row is model:solver[:schedule][@nfe/nfe...], got {item!r}")
        row = (parts[0], parts[1], parts[2] if len(parts) == 3 else "uniform")
        rows.append((*row, tuple(int(n) for n in nfes.split("/"))) if nfes else row)
    return tuple(rows)


def cells(rows: tuple[tuple, ...] = ROWS, nfes: tuple[int, ...] | None = None) -> list[tuple[str, str, str, int]]:
    """(model, solver, schedule, steps) for every cell whose NFE is a whole number of steps."""
    from arcdiff.model.solvers import get_solver

    out = []
    for model, solver, schedule, *own in rows:
        per = get_solver(solver).nfe_per_step
        row_nfes = own[0] if own else nfes or (PAPER_NFES if solver in PAPER_SOLVERS else NFES)
        out += [(model, solver, schedule, n // per) for n in row_nfes if n % per == 0]
    return out


def shown_path(path: str) -> str:
    """A path as the table prints it: an absolute one belongs to the machine that ran it, so it reads MNIST_DIR."""
    return "MNIST_DIR" if Path(path).is_absolute() else path


def shown_command(argv: list[str] | None, ref: str) -> list[str]:
    """The arguments as the table prints them: the reference folder as shown_path, without the
    options that do not change a figure (--existing-only, --force, --cache-dir and its folder)."""
    shown: list[str] = []
    args = iter(argv if argv is not None else sys.argv[1:])
    for a in args:
        if a in ("--existing-only", "--force") or a.startswith("--cache-dir="):
            continue
        if a == "--cache-dir":
            next(args, None)
            continue
        shown.append(shown_path(a) if a == ref else a)
    return shown


def _label(r: dict[str, Any]) -> str:
    return f"{r['solver']} ({r.get('schedule', 'uniform')})"


def _pivot(records: list[dict[str, Any]], fmt, title: str, nfes: list[int]) -> list[str]:
    by = {(r["model"], _label(r), r["nfe"]): r for r in records}
    rows = list(dict.fromkeys((r["model"], _label(r)) for r in records))
    lines = [
        f"**{title}**",
        "",
        "| model | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in nfes) + " |",
    ]
    for m, s in rows:
        lines.append(
            f"| {m} | {s} | " + " | ".join(fmt(by[(m, s, n)]) if (m, s, n) in by else "-" for n in nfes) + " |"
        )
    return [*lines, ""]


def markdown(records: list[dict[str, Any]], command: str) -> str:
    r0 = records[0]
    f = r0["floor"]
    nfes = sorted({r["nfe"] for r in records})
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


def plot_frontier(records: list[dict[str, Any]], path: Path) -> Path:
    """FID against NFE (log x), one line per sampler, one panel per model, the floor at K dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in records if r["model"] == model]
        for label in dict.fromkeys(_label(r) for r in mine):
            pts = sorted((r["nfe"], r["fid"]) for r in mine if _label(r) == label)
            style = "--" if label.split()[0] in PAPER_SOLVERS else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
        floor = mine[0].get("floor_fid_at_k")
        if floor is not None:
            ax.axhline(floor, color="grey", lw=1, ls=":", label=f"real data, same K ({floor:.1f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["nfe"] for r in mine})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        fids = [r["fid"] for r in mine] + ([floor] if floor is not None else [])
        ax.set_yticks(
            [t for t in (5, 10, 15, 20, 30, 40, 60, 100, 150, 200, 300) if min(fids) / 1.5 <= t <= max(fids) * 1.5]
        )
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations per image (NFE)")
        ax.set_title(f"{model}, K = {mine[0]['num_samples']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("FID (lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The table's options, on its own parser (`python -m arcdiff.eval.table`) or on `arcdiff eval table`."""
    p.add_argument("--ref", required=True, help="real images (the MNIST IDX folder)")
    p.add_argument("--num-samples", type=int, default=DEFAULT_SAMPLES, help="samples per cell")
    p.add_argument("--out", default="eval/table", help="output folder")
    p.add_argument("--model-dir", default=None, help="models folder (default: ARCDIFF_MODEL_DIR or the bundled models)")
    p.add_argument("--models", default="", help="comma-separated model names to keep (default: all rows)")
    p.add_argument(
        "--rows",
        default="",
        help="model:solver[:schedule][@nfe/nfe...],... (default: every sampler for both models)",
    )
    p.add_argument("--nfes", default="", help="comma-separated NFEs for every row (default: 5,10,20,40; +80 paper's)")
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


def main(argv: list[str] | None = None) -> int:
    return module_main("arcdiff eval table", __doc__, add_arguments, run, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the table's cells; `argv`, the table's own arguments, is recorded as the command."""
    import torch

    from arcdiff.eval.evaluate import evaluate, write_record
    from arcdiff.eval.features import get_extractor
    from arcdiff.eval.reference import reference_features
    from arcdiff.model.images import save_grid
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.model.solver_names import resolve
    from arcdiff.model.solvers import nfe

    if args.threads:
        torch.set_num_threads(args.threads)
    # --rename mnist-tiny=mnist runs the model "mnist-tiny" in the rows of "mnist"
    alias = {row: name for name, row in (kv.split("=", 1) for kv in args.rename.split(",") if kv)}
    keep = set(filter(None, args.models.split(",")))
    rows = parse_rows(args.rows) if args.rows else ROWS
    nfes = tuple(int(n) for n in args.nfes.split(",")) if args.nfes else None
    todo = [c for c in cells(rows, nfes) if not keep or c[0] in keep]
    registry = ModelRegistry(args.model_dir)
    loaded = (
        {}
        if args.existing_only
        else {m: registry.load(alias.get(m, m), device=args.device) for m in dict.fromkeys(c[0] for c in todo)}
    )
    out = Path(args.out)
    records_dir = out / "records"
    extractor = reference = None
    records = []
    t0 = time.time()
    left = sum(nfe(sv, st) for _, sv, _, st in todo) * args.num_samples  # image-evaluations still to run
    rate: list[float] = []  # seconds per image-evaluation, measured
    for i, (m, solver, schedule, steps) in enumerate(todo):
        grid = "" if schedule == "uniform" else f"-{schedule}"
        stem = f"{m}-{solver}{grid}-{steps}steps-k{args.num_samples}-seed{args.seed}"
        path = records_dir / f"{stem}.json"
        rec = json.loads(path.read_text()) if path.is_file() and not args.force else None
        if rec is not None and (args.existing_only or rec.get("ref") in (str(args.ref), shown_path(str(args.ref)))):
            left -= args.num_samples * nfe(solver, steps)
            print(f"[{i + 1}/{len(todo)}] {stem}: kept the existing record", flush=True)
        elif args.existing_only:
            print(f"[{i + 1}/{len(todo)}] {stem}: no record, left out", flush=True)
            continue
        else:
            if extractor is None:
                ch, size, _ = next(iter(loaded.values())).image_shape
                extractor = get_extractor("auto", ch, device=args.device)
                reference = reference_features(
                    args.ref, size, ch, extractor, cache_dir=args.cache_dir, progress=not args.quiet
                )
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
                schedule=schedule,
            )
            res.model = m  # the row's name, also under --rename
            res.ref = shown_path(res.ref)  # records are published: no path of this machine
            write_record(res, records_dir)
            rec = res.to_json()
            rate.append(res.wall_seconds / (res.num_samples * res.nfe))
            left -= res.num_samples * res.nfe
            eta = left * sum(rate) / len(rate) / 60
            print(f"[{i + 1}/{len(todo)}] {res.line()}  (about {eta:.0f} min left)", flush=True)
            default_solver, _, default_schedule = resolve(None, steps, None)
            if (solver, schedule) == (default_solver, default_schedule) and res.grid is not None:
                save_grid(res.grid, out / f"{m}-{solver}-{schedule}-{res.nfe}nfe.png", scale=2)
        records.append(rec)
    if not records:
        print("no records: nothing to write")
        return 1
    command = "arcdiff eval table " + " ".join(shown_command(argv, args.ref))
    write_table(out, records, command)
    print(
        f"{len(todo)} cells in {(time.time() - t0) / 60:.1f} min; wrote {out / 'table.md'}, {out / 'table.json'} "
        f"and {out / 'frontier.png'}"
    )
    return 0


def write_table(out: Path, records: list[dict[str, Any]], command: str) -> None:
    """OUT/table.json (the records and the command), OUT/table.md and OUT/frontier.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({"command": command, "records": records}, indent=2) + "\n")
    (out / "table.md").write_text(markdown(records, command))
    plot_frontier(records, out / "frontier.png")


if __name__ == "__main__":
    sys.exit(main())
