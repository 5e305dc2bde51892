"""Load the models a worker serves and prepare their forward functions (hooks for speed work).

On CPU the defaults are eager float32. On CUDA, `amp` runs the network under autocast,
`channels_last` changes its memory format, and `compile` wraps it in torch.compile and warms it
up once per batch bucket (so no request pays for a compile); "reduce-overhead" adds CUDA graphs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from model.format import LoadedModel
from model.registry import ModelRegistry
from worker import metrics as m
from worker.batch import bucket_sizes
from worker.engine import PAD_ETA, Forward

log = logging.getLogger("arcdiff.loading")

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else must be usable here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


@dataclass
class Prepared:
    loaded: LoadedModel
    forward: Forward
    load_s: float
    compile_s: float


def prepare_models(
    registry: ModelRegistry,
    names: Sequence[str],
    device: torch.device,
    max_batch: int,
    amp: str = "none",
    compile_mode: str = "none",
    channels_last: bool = False,
    failed: dict[str, str] | None = None,
) -> dict[str, Prepared]:
    """Load each model once and build its forward; records load/compile seconds as metrics.

    With `failed` given, a model that cannot be loaded is logged (which and why), recorded there
    and skipped; without it, the first failure raises."""
    out: dict[str, Prepared] = {}
    for name in names:
        if failed is None:
            out[name] = _prepare(registry, name, device, max_batch, amp, compile_mode, channels_last)
            continue
        try:
            out[name] = _prepare(registry, name, device, max_batch, amp, compile_mode, channels_last)
        except Exception as e:  # damaged weights, wrong architecture, out of memory, a failed compile
            failed[name] = f"{type(e).__name__}: {e}"
            log.error("model %s failed to load, not serving it: %s", name, failed[name])
    return out


def _prepare(registry: ModelRegistry, name: str, device: torch.device, max_batch: int, amp: str, compile_mode: str,
             channels_last: bool) -> Prepared:
    t0 = time.perf_counter()
    loaded = registry.load(name, device=device, amp_dtype=AMP_DTYPES[amp])
    load_s = time.perf_counter() - t0
    m.LOAD.labels(name).set(load_s)
    forward = _forward_for(loaded.denoiser, channels_last)
    compile_s = 0.0
    if compile_mode != "none":
        t0 = time.perf_counter()
        forward = torch.compile(forward, mode=None if compile_mode == "default" else compile_mode, dynamic=False)
        _warm_up(forward, loaded.image_shape, device, bucket_sizes(max_batch))
        compile_s = time.perf_counter() - t0
    m.COMPILE.labels(name).set(compile_s)
    log.info("loaded %s on %s in %.2f s (compile %.2f s)", name, device, load_s, compile_s)
    return Prepared(loaded, forward, load_s, compile_s)


def _forward_for(denoiser: torch.nn.Module, channels_last: bool) -> Forward:
    if not channels_last:
        return denoiser
    denoiser.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return denoiser(x.contiguous(memory_format=torch.channels_last), eta)

    return forward


def _warm_up(forward: Forward, shape: tuple[int, ...], device: torch.device, buckets: Sequence[int]) -> None:
    """One call per bucket shape, so compilation happens before the first request."""
    if hasattr(torch, "_dynamo"):
        # each bucket is its own static shape: allow one graph per bucket
        cfg = torch._dynamo.config
        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, max(getattr(cfg, attr), len(buckets) + 2))
    with torch.inference_mode():
        for b in buckets:
            forward(torch.zeros((b, *shape), device=device), torch.full((b,), PAD_ETA, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
