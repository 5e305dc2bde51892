"""Helpers shared by the command modules: settings from flags + environment, logging."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def settings_from(factory: Callable[..., T], **flags: Any) -> T:
    """Build settings where a flag given on the command line overrides its ARCDIFF_ variable.

    Exits with status 2 and the field's message when a value is invalid."""
    from pydantic import ValidationError

    try:
        return factory(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            print(f"arcdiff: invalid setting {field} (flag or ARCDIFF_{field.upper()}): {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    from arcdiff.worker.settings import AMP_CHOICES, COMPILE_CHOICES  # the settings' Literal types

    p.add_argument("--device", help="auto, cpu, mps, cuda or cuda:N (ARCDIFF_DEVICE; default auto)")
    p.add_argument(
        "--max-batch", type=int, metavar="N", help="images per network evaluation (ARCDIFF_MAX_BATCH; default 32)"
    )
    p.add_argument(
        "--model-dir", metavar="DIR", help="folder of model folders (ARCDIFF_MODEL_DIR; default: bundled models)"
    )
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING (ARCDIFF_LOG_LEVEL; default INFO)")
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        help="autocast dtype of the network (ARCDIFF_AMP; default auto: bf16 on CUDA, none on CPU)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        help="torch.compile mode, compiled per batch bucket at start-up; reduce-overhead adds CUDA graphs "
        "(ARCDIFF_COMPILE; default auto: reduce-overhead on CUDA, none on CPU)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format (ARCDIFF_CHANNELS_LAST; default: on for CUDA, off on CPU)",
    )


def engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags as settings fields (None where not given, so the environment applies)."""
    return {
        "device": args.device,
        "max_batch": args.max_batch,
        "model_dir": args.model_dir,
        "log_level": args.log_level,
        "amp": args.amp,
        "compile": args.compile,
        "channels_last": args.channels_last,
    }
