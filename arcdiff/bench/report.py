"""Output helpers shared by the benchmarks: JSON records and small text tables."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """What the figures were measured on: enough to tell two runs apart."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(record: dict[str, Any], path: str | None) -> None:
    """Write the record to `path` ('-' or None: stdout)."""
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    if path in (None, "-"):
        sys.stdout.write(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table of the given columns."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def add_run_arguments(p: argparse.ArgumentParser, whose: str = "the network") -> None:
    """The flags every engine benchmark shares: device, compile, amp, threads, JSON output."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="none",
        choices=("none", "default", "reduce-overhead", "max-autotune"),
        help=f"torch.compile {whose} (bare --compile: mode default; default none)",
    )
    p.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        default="none",
        choices=("none", "bf16", "fp16"),
        help=f"autocast {whose} (bare --amp: bf16; default none)",
    )
    p.add_argument("--threads", type=int, metavar="T", help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="write the JSON record here ('-': stdout)")
