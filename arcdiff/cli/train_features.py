"""`arcdiff train-features`: train the MNIST feature network used by `arcdiff eval`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-features",
        help="train the small MNIST classifier whose features `arcdiff eval` uses",
        description=(
            "Train the MNIST feature network (a small CNN classifier): fit on all but --holdout labelled "
            "images and report held-out accuracy, then refit on all of them, and write "
            "<name>.safetensors + <name>.json to OUT (mnist_features for --kind cnn, mnist_judge for --kind mlp)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--kind",
        choices=("cnn", "mlp"),
        default="cnn",
        help="cnn: the feature network (mnist_features); mlp: the second judge of `arcdiff eval sets --features "
        "judge` (mnist_judge)",
    )
    p.add_argument("--data", required=True, help="MNIST images IDX file, or the folder holding it and its labels")
    p.add_argument("--out", default="arcdiff/eval/weights", help="folder for the weights and facts")
    p.add_argument("--holdout", type=int, default=2000, help="images held out to measure accuracy (0: none)")
    p.add_argument("--no-refit", action="store_true", help="ship the held-out-split fit instead of refitting on all")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data per fit")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine-decayed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    import torch

    from arcdiff.eval.mnist_net import train_feature_net
    from arcdiff.training.data import DataError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        facts = train_feature_net(
            args.data,
            args.out,
            holdout=args.holdout,
            refit=not args.no_refit,
            epochs=args.epochs,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            progress=not args.quiet,
            kind=args.kind,
        )
    except (DataError, ValueError) as e:
        print(f"arcdiff train-features: error: {e}", file=sys.stderr)
        return 2
    held = facts.get("holdout")
    if held:
        print(f"held-out accuracy {held['accuracy']:.2%} ({held['train_images']} train / {held['test_images']} test)")
    print(f"weights written to {args.out} ({facts['wall_seconds']} s)")
    print(json.dumps({k: facts[k] for k in ("trained_on_images", "training_accuracy", "epochs")}))
    return 0
