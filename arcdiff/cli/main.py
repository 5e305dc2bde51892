"""The `arcdiff` console script: one subcommand per module in arcdiff/cli/.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func`.
Modules are imported lazily by name so `arcdiff --help` stays fast and a command's heavy
imports (torch, uvicorn) load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

# subcommand name -> module under arcdiff.cli
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "worker": "worker",
    "generate": "generate",
    "edit": "edit",
    "interpolate": "interpolate",
    "train": "train",
    "distill": "distill",
    "train-features": "train_features",
    "eval": "evaluate",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arcdiff",
        description="Dual-head diffusion models (x0 + eps on a quarter circle), served over HTTP.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, mod in import_commands("arcdiff.cli", COMMANDS):
        mod.register(sub)
    return parser


def import_commands(package: str, modules: dict[str, str]) -> list[tuple[str, Any]]:
    """(name, module) for each entry whose module exists (a command not built yet is left out)."""
    found = []
    for name, module in modules.items():
        try:
            found.append((name, importlib.import_module(f"{package}.{module}")))
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{module}":
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if hasattr(args, "argv"):  # a command that records its command line (`arcdiff eval table`) asks for it
        args.argv = argv
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
