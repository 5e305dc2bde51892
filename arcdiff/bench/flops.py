"""network cost in FLOP per image (forward, and one training step), and what a training run costs

Counts with torch.utils.flop_counter (a multiply-add is 2 FLOP) on the CPU, with random weights,
so it runs anywhere and needs no GPU. With --steps and --batch it adds the run's total, and with
--tflops the time that would take at that sustained rate: an estimate, never a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cifar10", help="network config (default cifar10)")
    p.add_argument("--heads", type=int, default=2, choices=[1, 2], help="1: eps-only, 2: dual head (default 2)")
    p.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as in train")
    p.add_argument("--steps", type=int, default=0, help="training steps, for the run's total (default: none)")
    p.add_argument("--batch", type=int, default=128, help="images per training step (default 128)")
    p.add_argument(
        "--tflops", type=float, nargs="*", default=[], help="sustained TFLOP/s to estimate the run's time at"
    )
    p.add_argument("--json", default="", help="also write the record to this file")


def measure(config: str, heads: int = 2, overrides: dict | None = None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from arcdiff.model.configs import get_config
    from arcdiff.model.loss import DiffusionLoss
    from arcdiff.model.unet import UNet, count_parameters

    cfg = get_config(config, heads, overrides)
    net = UNet(cfg)
    x0 = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x0, torch.rand(2))
    forward = fc.get_total_flops() / 2
    with FlopCounterMode(display=False) as fc:
        DiffusionLoss("dual" if heads == 2 else "eps")(net, x0, torch.Generator().manual_seed(0)).mean().backward()
    step = fc.get_total_flops() / 2
    return {
        "config": config,
        "heads": heads,
        "parameters": count_parameters(net),
        "forward_gflop": forward / 1e9,
        "train_gflop_per_image": step / 1e9,
    }


def run(args: argparse.Namespace) -> int:
    from arcdiff.model.configs import parse_overrides

    try:
        rec = measure(args.config, args.heads, parse_overrides(args.arch))
    except (KeyError, ValueError, TypeError) as e:
        print(f"arcdiff bench flops: {e}", file=sys.stderr)
        return 2
    print(
        f"{rec['config']}: {rec['parameters'] / 1e6:.2f}M parameters, forward {rec['forward_gflop']:.3f} GFLOP/image, "
        f"training step {rec['train_gflop_per_image']:.3f} GFLOP/image"
    )
    if args.steps:
        total = rec["train_gflop_per_image"] * 1e9 * args.batch * args.steps
        rec.update(steps=args.steps, batch=args.batch, total_flop=total, estimates=[])
        print(f"{args.steps} steps at batch {args.batch}: {total:.3g} FLOP")
        for t in args.tflops:
            hours = total / (t * 1e12) / 3600
            images_s = t * 1e12 / (rec["train_gflop_per_image"] * 1e9)
            rec["estimates"].append({"tflops": t, "hours": hours, "images_per_s": images_s})
            print(f"  at {t:g} TFLOP/s sustained: {images_s:,.0f} images/s, {hours:.1f} h (estimate)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
    return 0
