"""The `python -m arcdiff.eval.<table>` entry each evaluation module shares with `arcdiff eval <table>`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def module_main(
    prog: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace, list[str]], int],
    argv: list[str] | None = None,
) -> int:
    """Parse the module's own options and run it; its arguments are passed on to be recorded."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    return run(p.parse_args(argv), argv)
