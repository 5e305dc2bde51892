"""The `arcdiff` command line: one subcommand per module in this package (see main.py).

Kept outside the server package: the CLI drives the server, the worker, training and the
benchmarks, and none of them depends on it.
"""

from arcdiff.cli.main import build_parser, import_commands, main

__all__ = ["build_parser", "import_commands", "main"]
