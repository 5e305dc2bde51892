"""Training: Adam with warm-up, EMA of the weights, gradient clipping, exact resume.

A run folder holds `checkpoint.safetensors` (network, EMA and Adam tensors, RNG states) and
`checkpoint.json` (step, settings, the rest of the optimizer state). Restarting with the same
settings continues bit for bit. At the end the EMA weights are written as a model folder
(`<run>/<name>/config.json + model.safetensors`), the project's model format, ready to serve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from arcdiff.model.configs import get_config
from arcdiff.model.denoiser import heads_for
from arcdiff.model.format import make_config, save_model
from arcdiff.model.loss import OBJECTIVE_PREDICTION, DiffusionLoss, Objective
from arcdiff.model.unet import UNet, count_parameters
from arcdiff.training.checkpoint import (
    CHECKPOINT_STATE,
    TrainingError,
    check_settings,
    ema_decay,
    hardware_description,
    lr_schedule,
    optimizer_step,
    read_checkpoint,
    restore,
    running_mean,
    save_checkpoint,
    update_ema,
)
from arcdiff.training.data import load_images, to_model_range

LR_SCHEDULES = ("constant", "cosine")
__all__ = ["CHECKPOINT_STATE", "TrainSettings", "Trainer", "TrainingError", "lr_at", "train"]


@dataclass
class TrainSettings:
    config: str
    data: str
    out: str
    name: str = ""
    objective: Objective = "dual"
    gamma: float = 1.0
    steps: int = 10_000
    batch: int = 64
    lr: float = 2e-4
    warmup: int = 500
    ema: float = 0.999
    grad_clip: float = 1.0
    hflip: bool = False
    seed: int = 0
    checkpoint_every: int = 1000
    device: str = "cpu"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    arch: dict = field(default_factory=dict)  # UNetConfig field overrides on top of `config`
    eta_density: str = "uniform"  # how training draws eta; see model.loss.ETA_DENSITIES
    lr_schedule: str = "constant"  # constant after warm-up, or cosine decay to lr_min_ratio * lr at `steps`
    lr_min_ratio: float = 0.1
    compile: bool = False  # torch.compile the network for the training step (worth it on a GPU)
    channels_last: bool = False  # NHWC activations: faster convolutions on tensor-core GPUs

    # Settings that change the trajectory: a resume with different values would not continue
    # the same run, so it is refused.
    TRAJECTORY = (
        "config",
        "objective",
        "gamma",
        "batch",
        "lr",
        "warmup",
        "ema",
        "grad_clip",
        "hflip",
        "seed",
        "arch",
        "eta_density",
        "lr_schedule",
        "lr_min_ratio",
    )

    def model_name(self) -> str:
        return self.name or (self.config if self.objective == "dual" else f"{self.config}-{self.objective}")


def lr_at(step: int, settings: TrainSettings) -> float:
    """The learning rate at `step` (checkpoint.lr_schedule with the run's settings)."""
    return lr_schedule(step, settings.lr, settings.warmup, settings.steps, settings.lr_schedule, settings.lr_min_ratio)


class Trainer:
    """Holds the network, its EMA, the optimizer and the two generators of one run."""

    def __init__(self, settings: TrainSettings, images: torch.Tensor | None = None):
        self.s = settings
        if settings.objective not in OBJECTIVE_PREDICTION:
            raise TrainingError(f"unknown objective {settings.objective!r}; expected dual, eps or x0")
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = torch.device(settings.device)
        self.prediction = OBJECTIVE_PREDICTION[settings.objective]
        if settings.lr_schedule not in LR_SCHEDULES:
            raise TrainingError(f"unknown lr schedule {settings.lr_schedule!r}; expected one of {LR_SCHEDULES}")
        try:
            self.unet_config = get_config(settings.config, heads=heads_for(self.prediction), overrides=settings.arch)
        except (TypeError, ValueError) as e:
            raise TrainingError(f"network config {settings.config!r} with {settings.arch}: {e}") from None
        if images is None:
            images = load_images(settings.data, self.unet_config.image_size, self.unet_config.channels)
        if images.shape[0] < 1:
            raise TrainingError(f"{settings.data}: no images")
        # uint8 (N, C, H, W). On a GPU the whole set lives on the device (CIFAR-10 is 150 MB), so a
        # batch is one gather there: nothing on the host has to keep up with the GPU.
        self.images = images.to(self.device) if self.device.type == "cuda" else images
        torch.manual_seed(settings.seed)  # initial weights only; all later randomness is in the generators
        self.net = UNet(self.unet_config).to(self.device)
        if settings.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's Module.to overloads omit memory_format
        # the network the loss calls; self.net keeps the parameters and the state-dict names
        self.forward_net: torch.nn.Module = torch.compile(self.net) if settings.compile else self.net  # type: ignore[assignment]
        self.ema = UNet(self.unet_config).to(self.device).eval()
        self.ema.load_state_dict(self.net.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=settings.lr, fused=self.device.type == "cuda")
        self.loss_fn = DiffusionLoss(settings.objective, settings.gamma, settings.eta_density)
        self.g_data = torch.Generator().manual_seed(settings.seed)
        self.g_loss = torch.Generator(device=self.device).manual_seed(settings.seed + 1)
        self.step = 0
        self.wall_time = 0.0
        self.loss_avg = float("nan")
        self.use_amp = settings.amp and self.device.type == "cuda"

    # ---- one step -------------------------------------------------------------------------------
    def batch(self) -> torch.Tensor:
        idx = torch.randint(0, self.images.shape[0], (self.s.batch,), generator=self.g_data)
        x0 = to_model_range(self.images[idx.to(self.images.device)])
        if self.s.hflip:
            flip = torch.rand(self.s.batch, generator=self.g_data) < 0.5
            x0 = torch.where(flip.to(x0.device)[:, None, None, None], x0.flip(-1), x0)
        x0 = x0.to(self.device)
        return x0.contiguous(memory_format=torch.channels_last) if self.s.channels_last else x0

    def train_step(self) -> float:
        x0 = self.batch()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.s)
        self.net.train()
        if self.use_amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = self.loss_fn(self.forward_net, x0, self.g_loss).mean()
        else:
            loss = self.loss_fn(self.forward_net, x0, self.g_loss).mean()
        value = optimizer_step(loss, self.net, self.opt, self.s.grad_clip, "lower --lr or check the data", self.step)
        update_ema(self.ema, self.net, ema_decay(self.step, self.s.ema))
        self.step += 1
        self.loss_avg = running_mean(self.loss_avg, value)
        return value

    # ---- checkpoints ----------------------------------------------------------------------------
    def _parts(self) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Generator]]:
        return {"net": self.net, "ema": self.ema}, {"data": self.g_data, "loss": self.g_loss}

    def save_checkpoint(self, folder: Path) -> None:
        modules, generators = self._parts()
        state = {"step": self.step, "wall_time": self.wall_time, "loss_avg": self.loss_avg, "settings": asdict(self.s)}
        save_checkpoint(folder, modules, self.opt, generators, state)

    def load_checkpoint(self, folder: Path) -> None:
        state, tensors = read_checkpoint(folder)
        check_settings(state["settings"], self.s, TrainSettings.TRAJECTORY, folder / CHECKPOINT_STATE)
        modules, generators = self._parts()
        restore(state, tensors, modules, self.opt, generators)
        self.step, self.wall_time, self.loss_avg = state["step"], state["wall_time"], state["loss_avg"]

    # ---- the model folder -----------------------------------------------------------------------
    def training_facts(self) -> dict[str, Any]:
        return {
            "data": str(self.s.data),
            "num_images": int(self.images.shape[0]),
            "objective": self.s.objective,
            "gamma": self.s.gamma if self.s.objective == "dual" else None,
            "steps": self.step,
            "batch": self.s.batch,
            "lr": self.s.lr,
            "warmup": self.s.warmup,
            "ema": self.s.ema,
            "grad_clip": self.s.grad_clip,
            "hflip": self.s.hflip,
            "seed": self.s.seed,
            "arch": self.s.arch,
            "eta_density": self.s.eta_density,
            "lr_schedule": self.s.lr_schedule,
            "lr_min_ratio": self.s.lr_min_ratio if self.s.lr_schedule == "cosine" else None,
            "compile": self.s.compile,
            "channels_last": self.s.channels_last,
            "wall_time_s": round(self.wall_time, 1),
            "final_loss_ema": round(self.loss_avg, 5),
            "hardware": hardware_description(self.device),
            "torch": torch.__version__,
            "parameters": count_parameters(self.net),
        }

    def export(self, folder: Path) -> Path:
        name = self.s.model_name()
        cfg = make_config(name, self.unet_config, self.prediction, self.training_facts())
        return save_model(folder, self.ema, cfg)


def train(
    settings: TrainSettings,
    resume: bool = False,
    progress: bool = True,
    images: torch.Tensor | None = None,
    on_step: Callable[[Trainer], None] | None = None,
) -> Path:
    """Run (or continue) training to `settings.steps`; returns the exported model folder."""
    out = Path(settings.out)
    trainer = Trainer(settings, images)
    if resume and (out / CHECKPOINT_STATE).is_file():
        trainer.load_checkpoint(out)
    elif not resume and (out / CHECKPOINT_STATE).is_file():
        raise TrainingError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    from tqdm import tqdm

    bar = tqdm(total=settings.steps, initial=trainer.step, disable=not progress, unit="step", dynamic_ncols=True)
    t_last = time.perf_counter()
    while trainer.step < settings.steps:
        trainer.train_step()
        now = time.perf_counter()
        trainer.wall_time += now - t_last
        if progress:
            bar.update(1)
            bar.set_postfix(loss=f"{trainer.loss_avg:.4f}", img_s=f"{settings.batch / max(now - t_last, 1e-9):.0f}")
        t_last = now
        if on_step is not None:
            on_step(trainer)
        if trainer.step % settings.checkpoint_every == 0 or trainer.step == settings.steps:
            trainer.save_checkpoint(out)
            t_last = time.perf_counter()  # checkpoint I/O is not training time
    bar.close()
    return trainer.export(out / settings.model_name())
