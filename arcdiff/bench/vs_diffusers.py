"""this engine's ddim next to diffusers' DDIMPipeline on the same UNet2DModel weights

One diffusers UNet2DModel with random weights (speed does not depend on them) is saved to a
temporary folder, then sampled at the same steps and batch size
- by diffusers' own DDIMPipeline (output_type "np": sampling plus conversion to numpy), and
- by this engine with the ddim solver, loading the same folder through arcdiff/model/diffusers_adapter.py
  (sampling plus PNG encoding of every image, a little more work than diffusers does).
Each side is timed in its own processes, two per side and batch size in the order diffusers,
arcdiff, arcdiff, diffusers, each one unmeasured warm-up run and then REPEATS timed runs of one
batch; the record has the median seconds per batch of each and the ratio diffusers / arcdiff (above 1: arcdiff is
faster). Both run the same number of network evaluations (STEPS per image), in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from arcdiff.bench.report import add_run_arguments

# A small DDPM-style UNet2DModel: fast enough on a CPU, the same kinds of blocks as the big ones.
UNET_SIZES = {
    "small": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    # google/ddpm-cifar10-32's architecture (35.7M parameters)
    "ddpm-cifar10": {
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unet", default="small", choices=sorted(UNET_SIZES), help="UNet2DModel size (default small)")
    p.add_argument("--image-size", type=int, default=32, metavar="S", help="image side in pixels (default 32)")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="DDIM steps (default 20)")
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1, 64],
        metavar="B",
        help="batch sizes, each measured on both sides (default: 1 64)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        metavar="R",
        help="timed runs per process; two processes per side and batch (default 3)",
    )
    add_run_arguments(p, whose="this engine's network (the diffusers side runs as its pipeline does)")


def run(args: argparse.Namespace) -> int:
    from arcdiff.bench.report import table, write_json

    if args.steps < 1 or args.repeats < 1 or any(b < 1 for b in args.batch) or args.image_size < 8:
        print(
            "arcdiff bench diffusers: --steps, --repeats and --batch must be at least 1, --image-size at least 8",
            file=sys.stderr,
        )
        return 2
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("arcdiff bench diffusers: needs diffusers (pip install 'arcdiff[diffusers]')", file=sys.stderr)
        return 2
    from arcdiff.worker.loading import resolve_device

    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        print(f"arcdiff bench diffusers: {e}", file=sys.stderr)
        return 2
    try:
        record = compare(
            args.unet,
            args.image_size,
            args.steps,
            args.batch,
            args.repeats,
            device,
            args.compile,
            args.amp,
            args.threads,
        )
    except RuntimeError as e:
        print(f"arcdiff bench diffusers: {e}", file=sys.stderr)
        return 1
    print(
        table(record["results"], ["batch", "diffusers_s", "arcdiff_s", "ratio", "arcdiff_images_per_s"]),
        file=sys.stderr,
    )
    if args.json:
        write_json(record, args.json)
    return 0


def save_random_unet(folder: Path, size: str, image_size: int) -> int:
    """A UNet2DModel with random weights and a DDIM scheduler config, as a local pipeline folder."""
    import torch

    # the defining modules, not diffusers' lazy top level (whose type stubs are placeholder classes)
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, **UNET_SIZES[size])
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder / "scheduler")
    return sum(p.numel() for p in unet.parameters())


def _run_side(
    side: str,
    folder: Path,
    batch: int,
    steps: int,
    repeats: int,
    device: str,
    compile_mode: str,
    amp: str,
    threads: int | None,
) -> list[float]:
    """Time one side in a fresh process; returns its `repeats` timings (after one warm-up run)."""
    cmd = [
        sys.executable,
        "-m",
        "arcdiff.bench.vs_diffusers",
        side,
        str(folder),
        str(batch),
        str(steps),
        str(repeats),
        device,
        compile_mode,
        amp,
        str(threads or 0),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the {side} side failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def compare(
    size: str,
    image_size: int,
    steps: int,
    batches: list[int],
    repeats: int,
    device: Any,
    compile_mode: str = "none",
    amp: str = "none",
    threads: int | None = None,
) -> dict[str, Any]:
    """Both sides on the same saved weights; each timed in its own processes, in the order
    diffusers, arcdiff, arcdiff, diffusers per batch size (a steady drift of a shared machine's
    load then falls on both alike). Separate processes, because two threads doing torch work in
    one process slow each other down on a CPU (see arcdiff/worker/device_thread.py)."""
    import diffusers

    from arcdiff.bench.report import environment

    results = []
    with tempfile.TemporaryDirectory(prefix="arcdiff-bench-") as tmp:
        folder = Path(tmp) / "ddpm-random"
        params = save_random_unet(folder, size, image_size)
        for batch in batches:
            times: dict[str, list[float]] = {"diffusers": [], "arcdiff": []}
            for side in ("diffusers", "arcdiff", "arcdiff", "diffusers"):
                times[side] += _run_side(side, folder, batch, steps, repeats, str(device), compile_mode, amp, threads)
            theirs, ours = statistics.median(times["diffusers"]), statistics.median(times["arcdiff"])
            results.append(
                {
                    "batch": batch,
                    "diffusers_s": round(theirs, 6),
                    "arcdiff_s": round(ours, 6),
                    "ratio": round(theirs / ours, 3),
                    "arcdiff_images_per_s": round(batch / ours, 2),
                    "diffusers_images_per_s": round(batch / theirs, 2),
                    "diffusers_runs_s": [round(t, 6) for t in times["diffusers"]],
                    "arcdiff_runs_s": [round(t, 6) for t in times["arcdiff"]],
                }
            )
    return {
        "bench": "diffusers",
        "unet": size,
        "parameters": params,
        "image_size": image_size,
        "steps": steps,
        "nfe_per_image": steps,
        "repeats": repeats,
        "device": str(device),
        "compile": compile_mode,
        "amp": amp,
        "diffusers": diffusers.__version__,
        "ratio_is": "diffusers seconds / arcdiff seconds per batch (above 1: arcdiff faster)",
        "results": results,
        "environment": environment(),
    }


def _time_side(
    side: str,
    folder: Path,
    batch: int,
    steps: int,
    repeats: int,
    device_name: str,
    compile_mode: str,
    amp: str,
    threads: int,
) -> list[float]:
    """In the child process: build one side and time it."""
    import torch

    from arcdiff.worker.loading import resolve_device

    device = resolve_device(device_name)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Any) -> list[float]:
        fn()  # warm-up
        sync()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return out

    if side == "diffusers":  # as its users run it: on the main thread
        from diffusers.models.unets.unet_2d import UNet2DModel
        from diffusers.pipelines.ddim.pipeline_ddim import DDIMPipeline
        from diffusers.schedulers.scheduling_ddim import DDIMScheduler

        if threads:
            torch.set_num_threads(threads)
        unet = UNet2DModel.from_pretrained(str(folder / "unet"), use_safetensors=True, local_files_only=True)
        pipe = DDIMPipeline(
            unet=unet.to(device).eval(),
            scheduler=DDIMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True),
        )
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator("cpu").manual_seed(0)

        def diffusers_batch() -> None:
            with torch.inference_mode():
                pipe(batch_size=batch, num_inference_steps=steps, generator=gen, output_type="np")

        return timed(diffusers_batch)

    # arcdiff: as the worker runs it, all torch work on the engine's device thread
    from arcdiff.contract import GenerationSpec
    from arcdiff.model.diffusers_adapter import load_diffusers_model
    from arcdiff.worker.device_thread import DeviceThread
    from arcdiff.worker.engine import Engine, EngineConfig
    from arcdiff.worker.loading import AMP_DTYPES, Prepared, SpeedSettings, compiled_forward, forward_for

    dt = DeviceThread()
    if threads:
        dt.call(torch.set_num_threads, threads)
    loaded = dt.call(load_diffusers_model, folder, device=device, amp_dtype=AMP_DTYPES[amp])
    forward = forward_for(loaded.denoiser, False)
    if compile_mode != "none":
        forward = compiled_forward(forward, SpeedSettings(amp=amp, compile=compile_mode))
    config = EngineConfig(
        device=device, max_batch=batch, buckets=(batch,), warm_up=compile_mode != "none", worker="bench"
    )
    engine = Engine({"m": Prepared(loaded, forward)}, config, device_thread=dt).start()
    counter = iter(range(10**6))

    def arcdiff_batch() -> None:
        spec = GenerationSpec(
            id=f"b{next(counter)}", model="m", steps=steps, solver="ddim", seed=0, n=batch, submitted_at=time.time()
        )
        engine.submit(spec).result()

    try:
        return timed(arcdiff_batch)
    finally:
        engine.close()


if __name__ == "__main__":  # one side, run by compare() in its own process
    side, folder_arg, batch_arg, steps_arg, repeats_arg, device_arg, compile_arg, amp_arg, threads_arg = sys.argv[1:10]
    seconds = _time_side(
        side,
        Path(folder_arg),
        int(batch_arg),
        int(steps_arg),
        int(repeats_arg),
        device_arg,
        compile_arg,
        amp_arg,
        int(threads_arg),
    )
    print(json.dumps({"side": side, "seconds": seconds}))
