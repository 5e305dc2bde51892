"""Load the models a worker serves and build their forward functions for speed.

Per device, "auto" settings resolve to (see `resolve_speed`):
- CUDA: autocast to bf16 (fp16 where the card lacks bf16) for the network only, channels-last,
  and torch.compile in "reduce-overhead" mode (inductor kernels + CUDA graphs);
- CPU: eager, under bf16 autocast where the CPU has native bf16 (AVX512-BF16 or AMX-BF16, see
  `cpu_has_native_bf16`), float32 elsewhere (emulated bf16 is slower than float32);
- MPS: eager float32, unless asked.

A compiled forward is compiled once per batch bucket, with static shapes, during the warm-up
(`warm_up`, which `Engine.start` runs on the engine's own thread: CUDA graphs are recorded per
thread, so the thread that replays them must be the one that recorded them). If compiling fails,
the model is served eagerly and the error is logged (see `Prepared.eager`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arcdiff.model.format import LoadedModel
from arcdiff.model.registry import ModelRegistry
from arcdiff.worker import metrics as m

log = logging.getLogger("arcdiff.loading")

Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PAD_ETA = math.pi / 4  # eta for padding and warm-up rows: any finite value, their outputs are dropped


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


@dataclass(frozen=True)
class SpeedSettings:
    """How the network runs: autocast dtype, torch.compile mode, memory format."""

    amp: str = "none"  # none, bf16, fp16
    compile: str = "none"  # none, default, reduce-overhead, max-autotune
    channels_last: bool = False

    @property
    def cuda_graphs(self) -> bool:
        return self.compile in ("reduce-overhead", "max-autotune")


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU runs bf16 matrix products natively (oneDNN's bf16 convolutions use
    AVX512-BF16 or AMX-BF16); read from Linux's /proc/cpuinfo, False where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(f in flags for f in CPU_BF16_FLAGS)


def resolve_speed(
    device: torch.device, amp: str = "auto", compile_mode: str = "auto", channels_last: bool | None = None
) -> SpeedSettings:
    """Fill in the "auto" (None for channels_last) settings with the defaults for `device`."""
    cuda = device.type == "cuda"
    if amp == "auto":
        if cuda:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "none"
    if compile_mode == "auto":
        compile_mode = "reduce-overhead" if cuda else "none"
    if channels_last is None:
        channels_last = cuda
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be auto, none, bf16 or fp16, got {amp!r}")
    return SpeedSettings(amp, compile_mode, channels_last)


@dataclass
class Prepared:
    """A loaded model and the forward the engine runs it with."""

    loaded: LoadedModel
    forward: Forward  # what the engine calls: compiled when asked
    eager: Forward | None = None  # the uncompiled forward, the fallback if compiling fails; None when not compiled

    @classmethod
    def of(cls, model: LoadedModel | Prepared) -> Prepared:
        """A LoadedModel runs its own denoiser, eagerly."""
        return model if isinstance(model, Prepared) else cls(model, model.denoiser)


def prepare_models(
    registry: ModelRegistry,
    names: Sequence[str],
    device: torch.device,
    speed: SpeedSettings = SpeedSettings(),
    failed: dict[str, str] | None = None,
    backend: str | Callable[..., Any] = "inductor",
) -> dict[str, Prepared]:
    """Load each model once and build its forward; records load seconds as a metric.

    With `failed` given, a model that cannot be loaded is logged (which and why), recorded there
    and skipped; without it, the first failure raises. `backend` is torch.compile's (tests use
    "eager" to check dynamo's guards without paying for inductor)."""
    out: dict[str, Prepared] = {}
    for name in names:
        if failed is None:
            out[name] = _prepare(registry, name, device, speed, backend)
            continue
        try:
            out[name] = _prepare(registry, name, device, speed, backend)
        except Exception as e:  # damaged weights, wrong architecture, out of memory
            failed[name] = f"{type(e).__name__}: {e}"
            log.error("model %s failed to load, not serving it: %s", name, failed[name])
    return out


def _prepare(
    registry: ModelRegistry, name: str, device: torch.device, speed: SpeedSettings, backend: str | Callable[..., Any]
) -> Prepared:
    t0 = time.perf_counter()
    loaded = registry.load(name, device=device, amp_dtype=AMP_DTYPES[speed.amp])
    load_s = time.perf_counter() - t0
    m.LOAD.labels(name).set(load_s)
    eager = forward_for(loaded.denoiser, speed.channels_last)
    forward, fallback = eager, None
    if speed.compile != "none":
        forward, fallback = compiled_forward(eager, speed, backend), eager
    log.info(
        "loaded %s on %s in %.2f s (amp %s, compile %s, channels-last %s)",
        name,
        device,
        load_s,
        speed.amp,
        speed.compile,
        speed.channels_last,
    )
    return Prepared(loaded, forward, fallback)


def forward_for(denoiser: torch.nn.Module, channels_last: bool) -> Forward:
    """The denoiser itself, or a forward that feeds it channels-last inputs."""
    if not channels_last:
        return denoiser
    denoiser.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's Module.to overloads omit memory_format

    def forward(x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return denoiser(x.contiguous(memory_format=torch.channels_last), eta)

    return forward


def compiled_forward(forward: Forward, speed: SpeedSettings, backend: str | Callable[..., Any] = "inductor") -> Forward:
    """torch.compile with static shapes (one graph per batch bucket, compiled at warm-up).

    Under CUDA graphs a replay overwrites the previous replay's outputs, and the solvers keep
    some outputs across evaluations (dpmpp2m keeps x0_hat): the outputs are copied out, and each
    call is marked as a new step so the graph tree never waits for outputs it still holds."""
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):  # one graph per bucket: allow them all
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(getattr(cfg, attr), 32))
    mode = None if speed.compile == "default" or backend != "inductor" else speed.compile
    compiled = torch.compile(forward, mode=mode, dynamic=False, backend=backend)
    if not speed.cuda_graphs:
        return compiled

    def replay(x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        x0_hat, eps_hat = compiled(x, eta)
        return x0_hat.clone(), eps_hat.clone()

    return replay


class WarmUpFailed(RuntimeError):
    """A forward failed at warm-up and there is no eager forward to fall back to; str() says why."""


def warm_up(name: str, prepared: Prepared, buckets: Sequence[int], device: torch.device) -> tuple[Forward, float]:
    """Call the model's forward once per batch bucket, so every compile happens now and no request
    pays for one; returns the forward to serve (the eager one if compiling failed) and the seconds
    it took. Run it on the device thread, inside inference_mode, as the engine's ticks run.

    Raises WarmUpFailed when the forward fails and there is no eager one; an eager forward that
    fails too raises its own error."""
    t0 = time.perf_counter()
    forward = prepared.forward
    try:
        _run_buckets(forward, prepared.loaded.image_shape, buckets, device)
    except Exception as e:  # a compiler that cannot handle this model on this device
        why = f"{type(e).__name__}: {e}"
        if prepared.eager is None:
            log.exception("warm-up of %s failed; not serving it", name)
            raise WarmUpFailed(f"warm-up failed: {why}") from e
        log.exception("warm-up of %s failed; serving it uncompiled", name)
        forward = prepared.eager
        _run_buckets(forward, prepared.loaded.image_shape, buckets, device)
    seconds = time.perf_counter() - t0
    m.COMPILE.labels(name).set(seconds)
    log.info("warmed up %s on %s: buckets %s in %.2f s", name, device, list(buckets), seconds)
    return forward, seconds


def _run_buckets(forward: Forward, shape: Sequence[int], buckets: Sequence[int], device: torch.device) -> None:
    for b in buckets:
        x = torch.zeros((b, *shape), device=device)
        forward(x, torch.full((b,), PAD_ETA, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
