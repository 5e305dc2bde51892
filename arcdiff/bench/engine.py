"""the worker's engine alone: images/s, NFE/s, forward share of wall time, peak memory

Runs the real engine (continuous batching, solver groups, PNG encoding on threads) on one model
with the batch kept full: ROUNDS generations of BATCH images each are submitted at once, so the
engine runs them back to back at batch BATCH. Wall time runs from the first submission to the
last generation's PNGs. The time inside the network's forward is measured around each call
(CUDA events on a GPU, so it is device time, not launch time); the rest is the engine's own
work: solver updates, batching, bookkeeping, and PNG encoding where it does not overlap.

A model is either a registered one (--model, from ARCDIFF_MODEL_DIR or the bundled ones) or a
named network config with random weights (--config cifar10): speed does not depend on weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from arcdiff.bench.report import add_run_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="NAME", help="a registered model (default: mnist)")
    src.add_argument(
        "--config",
        metavar="NAME",
        help="a network config with random weights, dual head (cifar10, celeba64, church256, mnist, tiny)",
    )
    p.add_argument("--model-dir", metavar="DIR", help="folder of model folders (default ARCDIFF_MODEL_DIR or bundled)")
    p.add_argument(
        "--solver",
        default="ddim",
        help="solver (default ddim), or 'mix': every solver in each batch, as a busy service runs them",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        metavar="N",
        help="solver steps per image (default 20); with "
        "--solver mix, network evaluations per image (each solver gets the steps that cost about N)",
    )
    p.add_argument("--batch", type=int, default=64, metavar="B", help="images per network evaluation (default 64)")
    p.add_argument("--rounds", type=int, default=3, metavar="R", help="full batches measured (default 3)")
    p.add_argument(
        "--max-batch",
        type=int,
        metavar="M",
        help="the engine's max batch, with the worker's batch buckets (1, 2, 4, ..., M); rounds then run one "
        "after the other so the running batch is --batch (default: M = --batch, one bucket, rounds queued at once)",
    )
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument(
        "--edit-share",
        type=float,
        default=0.0,
        metavar="S",
        help="share of each generation's images run as inpainting edits instead (strength 1, bottom half masked: "
        "the same NFE per image, so NFE/s compares the editing path with plain generation; default 0)",
    )
    add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    from arcdiff.bench.report import write_json

    problems = []
    if args.steps < 1 or args.batch < 1 or args.rounds < 1:
        problems.append("--steps, --batch and --rounds must be at least 1")
    if not 0 <= args.edit_share <= 1:
        problems.append("--edit-share must be in [0, 1]")
    if args.max_batch is not None and args.max_batch < args.batch:
        problems.append("--max-batch must be at least --batch")
    from arcdiff.model.solvers import SOLVERS

    if args.solver not in SOLVERS and args.solver != "mix":
        problems.append(f"unknown solver {args.solver!r}; known: {', '.join(SOLVERS)}")
    if problems:
        print("arcdiff bench engine: " + "; ".join(problems), file=sys.stderr)
        return 2
    import torch

    from arcdiff.worker.device_thread import DeviceThread

    device_thread = DeviceThread()  # as in the worker: all torch work on the engine's thread
    if args.threads:
        device_thread.call(torch.set_num_threads, args.threads)
    try:
        loaded = device_thread.call(load_for_bench, args.model, args.config, args.model_dir, args.device, args.amp)
    except (KeyError, ValueError, RuntimeError) as e:
        print(f"arcdiff bench engine: {e}", file=sys.stderr)
        return 2
    record = measure_engine(
        loaded,
        solver=args.solver,
        steps=args.steps,
        batch=args.batch,
        rounds=args.rounds,
        max_batch=args.max_batch,
        compile_mode=args.compile,
        amp=args.amp,
        channels_last=args.channels_last,
        device_thread=device_thread,
        edit_share=args.edit_share,
    )
    print(summary(record), file=sys.stderr)
    if args.json:
        write_json(record, args.json)
    return 0


def load_for_bench(model: str | None, config: str | None, model_dir: str | None, device: str, amp: str = "none"):
    """A LoadedModel from the registry, or a dual-head network of a named config with random weights."""
    import torch

    from arcdiff.model.configs import get_config
    from arcdiff.model.denoiser import Denoiser
    from arcdiff.model.format import LoadedModel, make_config
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.model.unet import UNet
    from arcdiff.worker.loading import AMP_DTYPES, resolve_device

    dev = resolve_device(device)
    if config:
        cfg = get_config(config, heads=2)
        torch.manual_seed(0)
        net = UNet(cfg).to(dev).eval()
        meta = make_config(f"random-{config}", cfg, "x0_eps", {"weights": "random"})
        meta["parameters"] = sum(p.numel() for p in net.parameters())
        return LoadedModel(meta["name"], None, meta, Denoiser(net, "x0_eps", amp_dtype=AMP_DTYPES[amp]).eval())
    registry = ModelRegistry(model_dir)
    name = model or "mnist"
    if name not in registry.models:
        raise KeyError(f"unknown model {name!r} in {registry.root}; known: {', '.join(registry.names()) or 'none'}")
    return registry.load(name, device=dev, amp_dtype=AMP_DTYPES[amp])


class _TimedForward:
    """Wraps a forward and adds up the time spent inside it (device time on CUDA)."""

    def __init__(self, forward: Any, device: Any):
        self.forward = forward
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.calls = 0
        self.rows = 0  # rows the network saw, padding included
        self.events: list[tuple[Any, Any]] = []
        self.active = False

    def __call__(self, x: Any, eta: Any) -> Any:
        if not self.active:  # warm-up calls are not counted
            return self.forward(x, eta)
        self.calls += 1
        self.rows += x.shape[0]
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.forward(x, eta)
            end.record()
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.forward(x, eta)
        self.seconds += time.perf_counter() - t0
        return out

    def total(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.seconds += sum(s.elapsed_time(e) for s, e in self.events) / 1000
            self.events.clear()
        return self.seconds


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_engine(  # noqa: PLR0913 - one keyword per speed option that the benchmark compares
    loaded: Any,
    *,
    solver: str,
    steps: int,
    batch: int,
    rounds: int,
    max_batch: int | None = None,
    compile_mode: str = "none",
    amp: str = "none",
    channels_last: bool = False,
    backend: str = "inductor",
    device_thread: Any = None,
    edit_share: float = 0.0,
) -> dict[str, Any]:
    """Run `rounds` full batches through a fresh engine; returns the JSON record.

    `max_batch` (above `batch`): the engine gets the worker's buckets up to it and the rounds run
    one after the other, so each tick's batch is `batch` rows and the engine decides what the
    network sees (with padding: the next bucket).

    Pass the DeviceThread that loaded `loaded` (see arcdiff/worker/device_thread.py); the engine stops
    it."""
    import torch

    from arcdiff.bench.report import environment
    from arcdiff.contract import GenerationSpec
    from arcdiff.model.solvers import nfe
    from arcdiff.worker.engine import Engine, EngineConfig
    from arcdiff.worker.loading import Prepared, SpeedSettings, compiled_forward, forward_for

    device = next(loaded.denoiser.parameters()).device
    speed = SpeedSettings(amp=amp, compile=compile_mode, channels_last=channels_last)
    forward = forward_for(loaded.denoiser, channels_last)
    if compile_mode != "none":
        forward = compiled_forward(forward, speed, backend)
    timed = _TimedForward(forward, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # a larger max_batch: the engine's own buckets up to it; else exactly `batch`, one bucket
    buckets = None if max_batch and max_batch > batch else (batch,)
    config = EngineConfig(
        device=device,
        max_batch=max_batch if max_batch and buckets is None else batch,
        buckets=buckets,
        warm_up=compile_mode != "none",  # as in the worker: compiled networks warm up and get padded batches
        worker="bench",
    )
    engine = Engine({"m": Prepared(loaded, timed)}, config, device_thread=device_thread)
    t0 = time.perf_counter()
    engine.start()  # compiles (if asked) and runs one forward per bucket
    warm_up_s = time.perf_counter() - t0

    mix = round_specs(solver, steps, batch)
    edit = inpainting_fields(loaded.image_shape)

    def round_of(i: int) -> list[GenerationSpec]:
        specs = []
        for j, (sv, st, n, grid) in enumerate(mix):
            # with edit_share, part of each generation's images come as an inpainting edit instead
            edits = round(n * edit_share)
            for kind, count in (("generate", n - edits), ("edit", edits)):
                if count:
                    specs.append(
                        GenerationSpec(
                            id=f"bench-{i}-{j}-{kind}",
                            model="m",
                            steps=st,
                            solver=sv,
                            seed=1000 * i + 100 * j,
                            n=count,
                            submitted_at=time.time(),
                            schedule=grid,
                            **(edit if kind == "edit" else {}),
                        )
                    )
        return specs

    try:
        for s in round_of(-1):  # one unmeasured round: allocator, thread pool, caches
            engine.submit(s).result()
        timed.active = True
        t0, cpu0 = time.perf_counter(), time.process_time()
        if buckets:
            futures = engine.submit_many(s for i in range(rounds) for s in round_of(i))
            results = [f.result() for f in futures]
        else:
            results = []
            for i in range(rounds):
                futures = engine.submit_many(round_of(i))
                results += [f.result() for f in futures]
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        engine.close()
    forward_s = timed.total()
    images = rounds * batch
    evaluations = rounds * sum(nfe(sv, st) * n for sv, st, n, _ in mix)
    per_image_nfe = round(evaluations / images, 2)
    record: dict[str, Any] = {
        "bench": "engine",
        "model": loaded.name,
        "parameters": loaded.config.get("parameters"),
        "image_shape": list(loaded.image_shape),
        "device": str(device),
        "solver": solver,
        "steps": steps,
        "edit_share": edit_share,
        "nfe_per_image": per_image_nfe,
        "batch": batch,
        "max_batch": max_batch or batch,
        "rounds": rounds,
        "compile": compile_mode,
        "amp": amp,
        "channels_last": channels_last,
        "warm_up_s": round(warm_up_s, 3),
        "wall_s": round(wall, 6),
        "images": images,
        "images_per_s": round(images / wall, 3),
        # CPU seconds of this process (all its threads): the cost of the work on a CPU shared with others
        "cpu_s": round(cpu, 6),
        "images_per_cpu_s": round(images / cpu, 3),
        "nfe_per_s": round(evaluations / wall, 1),
        "generations_per_round": [{"solver": sv, "steps": st, "n": n, "schedule": g} for sv, st, n, g in mix],
        "forward_calls": timed.calls,
        "forward_rows_per_call": round(timed.rows / max(timed.calls, 1), 2),
        "forward_s": round(forward_s, 6),
        "forward_share": round(forward_s / wall, 4),
        "overhead_ms_per_tick": round((wall - forward_s) / max(timed.calls, 1) * 1000, 3),
        "batch_sizes": sorted(set().union(*(r.metrics.batch_sizes for r in results))),
        "environment": environment(),
    }
    if device.type == "cuda":
        record["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    record["peak_rss_bytes"] = _peak_rss_bytes()
    return record


def inpainting_fields(shape: tuple[int, int, int]) -> dict[str, Any]:
    """A spec's fields for an inpainting edit at strength 1 (the NFE of a generation): a mid-grey
    input with its bottom half masked."""
    import base64

    import numpy as np

    from arcdiff.model.images import png_bytes

    c, h, w = shape
    mask = np.zeros((1, h, w), np.uint8)
    mask[:, h // 2 :] = 255

    def b64(arr: np.ndarray) -> str:
        return base64.b64encode(png_bytes(arr)).decode("ascii")

    return {"kind": "edit", "image": b64(np.full((c, h, w), 128, np.uint8)), "mask": b64(mask), "strength": 1.0}


def round_specs(solver: str, steps: int, batch: int) -> list[tuple[str, int, int, str]]:
    """(solver, steps, n, schedule) of the generations that make one round of `batch` images. One
    solver: one generation on the uniform grid. 'mix': one generation per (solver, time grid), the
    images split as evenly as they go (the grids in turn, so every solver and every grid is in the
    batch from 30 images on), each with the steps that cost about `steps` evaluations per image
    (rk4 gets steps // 4)."""
    from arcdiff.model.solvers import GRIDS, SOLVERS, get_solver

    if solver != "mix":
        return [(solver, steps, batch, "uniform")]
    combos = [(name, grid) for grid in GRIDS for name in SOLVERS]
    share, extra = divmod(batch, len(combos))
    out = []
    for j, (name, grid) in enumerate(combos):
        n = share + (1 if j < extra else 0)
        if n:
            out.append((name, max(1, steps // get_solver(name).nfe_per_step), n, grid))
    return out


def summary(r: dict[str, Any]) -> str:
    mem = r.get("peak_device_memory_bytes", r["peak_rss_bytes"])
    return (
        f"{r['model']} on {r['device']}: {r['solver']} {r['steps']} steps ({r['nfe_per_image']} NFE/image), "
        f"batch {r['batch']} x {r['rounds']} rounds, compile {r['compile']}, amp {r['amp']}: "
        f"{r['images_per_s']:.2f} images/s, {r['nfe_per_s']:.0f} NFE/s, "
        f"{100 * r['forward_share']:.1f}% of wall time in the forward "
        f"({r['overhead_ms_per_tick']:.2f} ms engine work per tick), peak memory {mem / 2**20:.0f} MiB"
    )
