"""`arcdiff train`: train a network config on local data and write a model folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on local data (MNIST IDX, CIFAR-10 batches, or an image folder)",
        description=(
            "Train a UNet on local images and write a model folder (config.json + model.safetensors, "
            "EMA weights) to OUT/NAME. Checkpoints go to OUT every --checkpoint-every steps; --resume "
            "continues the run bit for bit."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", required=True, help="network config: mnist, cifar10, celeba64, church256, tiny")
    p.add_argument("--data", required=True, help="MNIST IDX file/folder, CIFAR-10 batch folder, or image folder")
    p.add_argument("--out", required=True, help="run folder (checkpoints; the model folder is OUT/NAME)")
    p.add_argument("--name", default="", help="model name (default: the config name, with -eps/-x0 for baselines)")
    p.add_argument(
        "--objective",
        choices=["dual", "eps", "x0"],
        default="dual",
        help="dual: x0 and eps heads with equation (12); eps or x0: one-head baselines",
    )
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the velocity term in equation (12)")
    p.add_argument("--steps", type=int, default=10_000, help="optimizer steps in total")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate after warm-up")
    p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the served weights")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (not for digits)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and noise")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--no-amp", action="store_true", help="train in float32 on CUDA (default: bf16 autocast)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument(
        "--arch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the network config, repeatable: e.g. --arch ch=24 --arch time_cond=logsnr "
        "--arch ch_mult=[1,2,2] (fields: see arcdiff/model/unet.py UNetConfig)",
    )
    p.add_argument(
        "--eta-density",
        choices=["uniform", "logit_normal"],
        default="uniform",
        help="how training draws eta: uniform on [0, pi/2] (the paper) or logit-normal (more of the middle)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="after warm-up: constant, or cosine decay to --lr-min-ratio * lr at --steps",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU training; slow start)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPU training)")
    p.add_argument("--lr-min-ratio", type=float, default=0.1, help="final lr / lr with --lr-schedule cosine")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from arcdiff.model.configs import parse_overrides
    from arcdiff.training.data import DataError
    from arcdiff.training.train import TrainingError, TrainSettings, train

    try:
        arch = parse_overrides(args.arch)
    except ValueError as e:
        print(f"arcdiff train: error: {e}", file=sys.stderr)
        return 2
    settings = TrainSettings(
        config=args.config,
        data=args.data,
        out=args.out,
        name=args.name,
        objective=args.objective,
        gamma=args.gamma,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        ema=args.ema,
        grad_clip=args.grad_clip,
        hflip=args.hflip,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        amp=not args.no_amp,
        threads=args.threads,
        arch=arch,
        eta_density=args.eta_density,
        lr_schedule=args.lr_schedule,
        lr_min_ratio=args.lr_min_ratio,
        compile=args.compile,
        channels_last=args.channels_last,
    )
    try:
        folder = train(settings, resume=args.resume, progress=not args.quiet)
    except (DataError, TrainingError, KeyError) as e:
        print(f"arcdiff train: error: {e}", file=sys.stderr)
        return 2
    print(f"model written to {folder}")
    return 0
