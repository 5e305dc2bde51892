"""`arcdiff bench`: benchmarks that report figures as JSON (engine, http, diffusers)."""

from __future__ import annotations

import argparse

HELP = """Measure, don't guess. Each benchmark prints a summary and writes a JSON record (--json).

  engine     the worker's engine alone: images/s, NFE/s, the share of wall time inside the
             network's forward (the rest is engine overhead), peak memory
  http       a running service driven with a request mix: throughput, latency percentiles, errors
  diffusers  the same diffusers UNet2DModel weights sampled by diffusers' DDIMPipeline and by this
             engine's ddim at the same steps and batch: the speed ratio
  gpu-check  engine over batch 1/8/64, eager fp32 vs compile + bf16 (what deploy/gpu-check.sh runs)
  flops      a network's FLOP per image (forward, training step) and a training run's estimated cost
  api-start  a Redis-mode API process: launch to /readyz, resident memory (no torch loaded)"""

# benchmark name -> module under arcdiff/bench/ exposing add_arguments(parser) and run(args) -> int
BENCHES = {
    "engine": "engine",
    "http": "http",
    "diffusers": "vs_diffusers",
    "gpu-check": "gpu_check",
    "flops": "flops",
    "api-start": "api_start",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: engine, http, diffusers (JSON out)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inner = p.add_subparsers(dest="bench", metavar="BENCH")
    inner.required = True
    from arcdiff.cli.main import import_commands

    for name, mod in import_commands("arcdiff.bench", BENCHES):
        q = inner.add_parser(
            name,
            help=mod.__doc__.strip().splitlines()[0],
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(q)
        q.set_defaults(func=mod.run)
