"""the engine benchmark over batch sizes, eager float32 and compiled bf16: a table for a new host

What deploy/gpu-check.sh runs: `bench engine` for one network config with random weights (default
cifar10, the paper's 35.7M-parameter UNet) at batch 1, 8 and 64, each once in eager float32 and
once with torch.compile (reduce-overhead: CUDA graphs) + bf16 autocast + channels-last, all in one
process, within a time budget (runs that would start after it are reported as skipped). Prints a
table and writes every record to one JSON file.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TypedDict


class Variant(TypedDict):
    """measure_engine's speed options for one variant."""

    compile_mode: str
    amp: str
    channels_last: bool


VARIANTS: dict[str, Variant] = {
    "eager-fp32": {"compile_mode": "none", "amp": "none", "channels_last": False},
    "compile-bf16": {"compile_mode": "reduce-overhead", "amp": "bf16", "channels_last": True},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cifar10", help="network config with random weights (default cifar10)")
    p.add_argument(
        "--batches", type=int, nargs="+", default=[1, 8, 64], metavar="B", help="batch sizes (default 1 8 64)"
    )
    p.add_argument("--steps", type=int, default=20, metavar="N", help="ddim steps per image (default 20)")
    p.add_argument("--rounds", type=int, default=3, metavar="R", help="full batches measured per run (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to try the script (default cuda)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=270.0,
        metavar="S",
        help="no run starts after this many seconds (default 270: the script ends within 5 minutes)",
    )
    p.add_argument("--json", metavar="PATH", help="write all records here ('-': stdout)")


def run(args: argparse.Namespace) -> int:
    import torch

    from arcdiff.bench.engine import load_for_bench, measure_engine
    from arcdiff.bench.report import environment, table, write_json
    from arcdiff.worker.device_thread import DeviceThread

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"arcdiff bench gpu-check: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"arcdiff bench gpu-check: CUDA is not available here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); check the driver (nvidia-smi) and the container's GPU access, or pass "
            "--device cpu to try the script",
            file=sys.stderr,
        )
        return 1
    start = time.monotonic()
    rows: list[dict[str, Any]] = []
    records = []
    # eager runs first (seconds), then the compiled ones from the largest batch down: if compiling
    # is slow on this host, the budget cuts the least telling run (batch 1), not batch 64
    compiled = [v for v in variants if VARIANTS[v]["compile_mode"] != "none"]
    order = [(v, b) for v in variants if v not in compiled for b in sorted(args.batches)]
    order += [(v, b) for v in compiled for b in sorted(args.batches, reverse=True)]
    for variant, batch in order:
        row: dict[str, Any] = {"variant": variant, "batch": batch}
        if time.monotonic() - start > args.budget_s:
            row["note"] = "skipped: time budget"
            rows.append(row)
            continue
        device_thread = DeviceThread()
        try:
            loaded = device_thread.call(load_for_bench, None, args.config, None, args.device, VARIANTS[variant]["amp"])
            rec = measure_engine(
                loaded,
                solver="ddim",
                steps=args.steps,
                batch=batch,
                rounds=args.rounds,
                device_thread=device_thread,
                **VARIANTS[variant],
            )
        except Exception as e:  # one failed variant (say, a compiler problem) must not hide the others
            device_thread.shutdown()
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
            continue
        records.append({"variant": variant, **rec})
        mem = rec.get("peak_device_memory_bytes", rec["peak_rss_bytes"])
        row.update(
            {
                "images/s": rec["images_per_s"],
                "NFE/s": rec["nfe_per_s"],
                "forward %": round(100 * rec["forward_share"], 1),
                "warm-up s": rec["warm_up_s"],
                "peak MiB": round(mem / 2**20),
            }
        )
        rows.append(row)
        print(f"  {variant} batch {batch}: {rec['images_per_s']:.1f} images/s", file=sys.stderr)
    rows.sort(key=lambda row: (variants.index(row["variant"]), row["batch"]))
    env = environment()
    out = sys.stderr if args.json == "-" else sys.stdout  # stdout then carries the JSON alone
    print(
        f"\n{args.config} (random weights), ddim {args.steps} steps, on {env.get('gpu', args.device)} "
        f"(torch {env['torch']}), {time.monotonic() - start:.0f} s",
        file=out,
    )
    print(
        table(rows, ["variant", "batch", "images/s", "NFE/s", "forward %", "warm-up s", "peak MiB", "note"]), file=out
    )
    if args.json:
        write_json(
            {
                "bench": "gpu-check",
                "config": args.config,
                "steps": args.steps,
                "rows": rows,
                "records": records,
                "environment": env,
            },
            args.json,
        )
    return 0
