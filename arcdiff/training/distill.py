"""Progressive distillation (Salimans & Ho 2022) of a dual-head model in its own parameterisation.

The forward process is x = cos(eta) x0 + sin(eta) eps (eta = pi/2 is pure noise), which is the
v-parameterisation of Salimans & Ho with alpha = cos, sigma = sin, so their method applies as is.
A round turns a teacher sampled with 2N deterministic DDIM steps into a student that takes N:

1. The student starts as a copy of the teacher (its EMA weights; the first teacher is the given
   model, each later one the previous round's student).
2. A training image x0, noise eps and a step i of the student's grid (N steps, `schedule.grid_etas`)
   give eta_t = grid_N[i], eta_s = grid_N[i + 1] and x_t = cos(eta_t) x0 + sin(eta_t) eps.
3. The teacher takes two DDIM steps on the grid of 2N, eta_t -> eta_mid -> eta_s, reaching x''.
   Each is the project's `ddim` solver step: the heads projected onto the constraint
   (schedule.consistent_pair, keeping their velocity), then x_next = cos(eta') x0 + sin(eta') eps.
   On the projected pair this is the exact exponential-integrator step of this parameterisation.
4. The student's x0 target is the one that makes a single DDIM step from x_t land on x'':
       x0_tgt = (x'' - (sin s / sin t) x_t) / (cos s - sin s cos t / sin t)
              = (sin t x'' - sin s x_t) / sin(t - s)           (the form computed, no cot at t -> 0)
   and the eps target follows from the constraint, eps_tgt = (x_t - cos t x0_tgt) / sin t. The pair
   is consistent (x_t = cos t x0_tgt + sin t eps_tgt), so the projection leaves it unchanged and the
   student's DDIM step from x_t with its heads at the targets is exactly x''.
5. Loss: the x0 head's MSE weighted by the truncated SNR, max(cot^2 eta_t, 1) (Salimans & Ho), plus
   the eps head's MSE to its target, unweighted: both heads are trained so the student stays a
   dual-head model. (On the projected pair a DDIM step is x_next = cos(t - s) x_t - sin(t - s) v_hat
   with v_hat = -sin t x0_hat + cos t eps_hat: near the data the step rests on the eps head, which
   is why it keeps full weight there, and near the noise on the x0 head, which the weight keeps at
   least 1.)
6. N halves each round down to `final_steps`; after every round its student is written as a model
   folder `<out>/<name>-<N>step` whose config's "distilled" object names the teacher, the step
   count, the solver (ddim) and the grid to sample it with.

Only the uniform grid is offered: it is nested (grid_2N[2i] = grid_N[i]), so the teacher's two
steps run on its own grid of 2N. The tuned grids (karras, logsnr) change their range with the step
count, so their 2N-step grid does not pass through the N-step grid's points.

Checkpoints, resume, EMA, learning rate and GPU settings work as in `arcdiff train` (shared code in
training/checkpoint.py): a run folder holds checkpoint.safetensors (teacher, student, EMA, Adam,
generators) and checkpoint.json (step, settings, the finished rounds), and a resume with the same
settings continues bit for bit.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from arcdiff.model.denoiser import Denoiser
from arcdiff.model.format import Distilled, LoadedModel, ModelFormatError, load_model, make_config, save_model
from arcdiff.model.registry import ModelRegistry
from arcdiff.model.schedule import consistent_pair, expand_like, grid_etas
from arcdiff.model.unet import UNet, UNetConfig, count_parameters
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
from arcdiff.training.train import LR_SCHEDULES

SCHEDULES = ("uniform",)  # nested grids only: see the module docstring
SOLVER = "ddim"


@dataclass
class DistillSettings:
    teacher: str  # a model folder, or a model name in ARCDIFF_MODEL_DIR (default: the bundled models)
    data: str
    out: str
    name: str = ""  # the students are <name>-<N>step; default: the teacher's name
    teacher_steps: int = 64  # the teacher's DDIM steps the first round distils from
    first_substeps: int = 2  # teacher steps per student step in the first round (later rounds: 2)
    final_steps: int = 1  # the last round's student steps
    schedule: str = "uniform"
    round_steps: int = 4000  # optimizer steps per round
    batch: int = 64
    lr: float = 1e-4
    warmup: int = 100  # per round
    lr_schedule: str = "cosine"  # per round: decay to lr_min_ratio * lr at the round's end
    lr_min_ratio: float = 0.0
    ema: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    device: str = "cpu"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    compile: bool = False  # torch.compile the student and the teacher (worth it on a GPU)

    # settings that change the trajectory: a resume with other values is refused
    TRAJECTORY = (
        "teacher",
        "teacher_steps",
        "first_substeps",
        "final_steps",
        "schedule",
        "round_steps",
        "batch",
        "lr",
        "warmup",
        "lr_schedule",
        "lr_min_ratio",
        "ema",
        "grad_clip",
        "seed",
    )

    def rounds(self) -> int:
        return round(math.log2(self.teacher_steps / self.final_steps / self.first_substeps)) + 1

    def student_steps(self, round_index: int) -> int:
        return (self.teacher_steps // self.first_substeps) >> round_index

    def substeps(self, round_index: int) -> int:
        """Teacher DDIM steps per student step: the first round's teacher may take more."""
        return self.first_substeps if round_index == 0 else 2


def validate(s: DistillSettings) -> None:
    k = s.first_substeps
    if k < 2 or k & (k - 1):
        raise TrainingError(f"--first-substeps ({k}) must be a power of 2, at least 2 (nested grids)")
    if s.final_steps < 1 or s.teacher_steps < s.final_steps * k:
        raise TrainingError(
            f"--teacher-steps ({s.teacher_steps}) must be at least --final-steps ({s.final_steps}) times "
            f"--first-substeps ({k})"
        )
    if (s.final_steps * k) << (s.rounds() - 1) != s.teacher_steps:
        raise TrainingError(
            f"--teacher-steps ({s.teacher_steps}) must be --final-steps ({s.final_steps}) times --first-substeps "
            f"({k}) times a power of 2"
        )
    if s.schedule not in SCHEDULES:
        raise TrainingError(
            f"schedule {s.schedule!r}: only {', '.join(SCHEDULES)} (a nested grid: the teacher's two steps "
            "must start and end on the student's grid points)"
        )
    if s.lr_schedule not in LR_SCHEDULES:
        raise TrainingError(f"unknown lr schedule {s.lr_schedule!r}; expected one of {LR_SCHEDULES}")
    if s.round_steps < 1 or s.batch < 1:
        raise TrainingError("--round-steps and --batch must be at least 1")


def load_teacher(spec: str) -> LoadedModel:
    """A model folder (a path holding config.json) or a model name in the registry."""
    try:
        model = load_model(spec) if (Path(spec) / "config.json").is_file() else ModelRegistry().load(spec)
    except (KeyError, ModelFormatError) as e:
        raise TrainingError(f"teacher {spec!r}: {e.args[0] if e.args else e}") from None
    if model.config.get("prediction") != "x0_eps":
        raise TrainingError(
            f"teacher {spec!r} predicts {model.config.get('prediction')!r}: distillation here needs a dual-head "
            "(x0_eps) model, whose student keeps both heads"
        )
    return model


# ---- the method -----------------------------------------------------------------------------
def ddim_step(
    x: torch.Tensor, x0_hat: torch.Tensor, eps_hat: torch.Tensor, eta: torch.Tensor, eta_next: torch.Tensor
) -> torch.Tensor:
    """One step of the project's `ddim` solver (model.solvers.DDIM) from eta to eta_next, per sample:
    the heads projected onto x = cos x0 + sin eps (consistent_pair), then cos(eta') x0 + sin(eta') eps."""
    x0, eps = consistent_pair(x, x0_hat, eps_hat, eta)
    return expand_like(torch.cos(eta_next), x) * x0 + expand_like(torch.sin(eta_next), x) * eps


def student_targets(
    x_t: torch.Tensor, x_target: torch.Tensor, eta_t: torch.Tensor, eta_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_tgt, eps_tgt) such that one DDIM step from x_t at eta_t to eta_s lands on x_target.

    x0_tgt = (x'' - (sin s / sin t) x_t) / (cos s - sin s cos t / sin t), computed as
    (sin t x'' - sin s x_t) / sin(t - s); eps_tgt = (x_t - cos t x0_tgt) / sin t. Coefficients in
    float64, cast to x's dtype."""
    st, ss = torch.sin(eta_t.double()), torch.sin(eta_s.double())
    d = torch.sin(eta_t.double() - eta_s.double())
    a, b = expand_like((st / d).to(x_t.dtype), x_t), expand_like((ss / d).to(x_t.dtype), x_t)
    x0_tgt = a * x_target - b * x_t
    ct, inv_st = expand_like(torch.cos(eta_t.double()).to(x_t.dtype), x_t), expand_like((1 / st).to(x_t.dtype), x_t)
    return x0_tgt, (x_t - ct * x0_tgt) * inv_st


def snr_weight(eta_t: torch.Tensor) -> torch.Tensor:
    """Truncated-SNR weight of the x0 loss, max(cot^2 eta, 1) (Salimans & Ho 2022)."""
    cot2 = (torch.cos(eta_t.double()) / torch.sin(eta_t.double())) ** 2
    return cot2.clamp_min(1.0)


@dataclass
class DistillBatch:
    """One batch of the distillation problem: where the student starts and what it must predict."""

    x_t: torch.Tensor
    eta_t: torch.Tensor  # per sample, in x0's dtype
    x0_tgt: torch.Tensor
    eps_tgt: torch.Tensor
    weight: torch.Tensor  # per sample: the x0 term's weight


@torch.no_grad()
def make_targets(
    teacher: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x0: torch.Tensor,
    eps: torch.Tensor,
    i: torch.Tensor,
    student_steps: int,
    schedule: str = "uniform",
    substeps: int = 2,
) -> DistillBatch:
    """Phases 2-4 of the module docstring for a batch: x_t on the student's grid at step i, the
    teacher's `substeps` DDIM steps on the grid of substeps * N (two, except where a first round
    starts from more), and the closed-form student targets."""
    grid_n, grid_k = grid_etas(student_steps, schedule), grid_etas(substeps * student_steps, schedule)
    i_cpu = i.cpu()
    # guards SCHEDULES: the teacher's grid passes through the student's points
    if not torch.allclose(grid_k[::substeps], grid_n, rtol=0, atol=1e-12):
        raise TrainingError(f"grid {schedule!r} is not nested")
    # the student's own points at both ends; the angles in x0's dtype, as the solvers pass them
    etas = [grid_n[i_cpu]] + [grid_k[substeps * i_cpu + j] for j in range(1, substeps)] + [grid_n[i_cpu + 1]]
    etas = [e.to(device=x0.device, dtype=x0.dtype) for e in etas]
    eta_t, eta_s = etas[0], etas[-1]
    x_t = expand_like(torch.cos(eta_t), x0) * x0 + expand_like(torch.sin(eta_t), x0) * eps
    x = x_t
    for eta, eta_next in itertools.pairwise(etas):
        x0_hat, eps_hat = teacher(x, eta)
        x = ddim_step(x, x0_hat.to(x0.dtype), eps_hat.to(x0.dtype), eta, eta_next)
    x0_tgt, eps_tgt = student_targets(x_t, x, eta_t, eta_s)
    return DistillBatch(x_t, eta_t, x0_tgt, eps_tgt, snr_weight(eta_t).to(x0.dtype))


def distill_loss(
    student: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], b: DistillBatch
) -> torch.Tensor:
    """Per-sample loss: max(cot^2 eta_t, 1) * MSE(x0_hat, x0_tgt) + MSE(eps_hat, eps_tgt)."""
    x0_hat, eps_hat = student(b.x_t, b.eta_t)
    dims = tuple(range(1, b.x_t.ndim))
    x0_term = ((x0_hat.float() - b.x0_tgt) ** 2).mean(dims)
    eps_term = ((eps_hat.float() - b.eps_tgt) ** 2).mean(dims)
    return b.weight * x0_term + eps_term


# ---- the run --------------------------------------------------------------------------------
class Distiller:
    """Teacher, student, its EMA, the optimizer and the generators of one distillation run."""

    def __init__(self, settings: DistillSettings, images: torch.Tensor | None = None):
        validate(settings)
        self.s = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = torch.device(settings.device)
        teacher = load_teacher(settings.teacher)
        self.teacher_config = teacher.config
        self.teacher_name = str(teacher.config.get("name", teacher.name))
        self.unet_config = UNetConfig.from_dict(teacher.config["architecture"])
        if images is None:
            images = load_images(settings.data, self.unet_config.image_size, self.unet_config.channels)
        if images.shape[0] < 1:
            raise TrainingError(f"{settings.data}: no images")
        self.images = images.to(self.device) if self.device.type == "cuda" else images
        weights = cast(Denoiser, teacher.denoiser).net.state_dict()
        # three copies of the teacher's (EMA) weights: the frozen teacher, the student, its EMA
        self.teacher = UNet(self.unet_config).to(self.device).eval().requires_grad_(False)
        self.net = UNet(self.unet_config).to(self.device)
        self.ema = UNet(self.unet_config).to(self.device).eval().requires_grad_(False)
        for m in (self.teacher, self.net, self.ema):
            m.load_state_dict(weights)
        self.use_amp = settings.amp and self.device.type == "cuda"
        amp = torch.bfloat16 if self.use_amp else None
        # the networks the loss calls (compiled or not); self.net keeps the parameters and their names
        teacher_net, student_net = (self._compiled(m) for m in (self.teacher, self.net))
        self.teacher_fn = Denoiser(teacher_net, "x0_eps", clip=None, amp_dtype=amp)
        self.student_fn = Denoiser(student_net, "x0_eps", clip=None, amp_dtype=amp)
        self.opt = self._new_optimizer()
        self.g_data = torch.Generator().manual_seed(settings.seed)
        self.g_noise = torch.Generator(device=self.device).manual_seed(settings.seed + 1)
        self.step = 0  # over all rounds
        self.wall_time = 0.0
        self.loss_avg = float("nan")
        self.history: list[dict[str, Any]] = []  # one entry per finished round
        self.curve: list[list[float]] = []  # [step, student steps, loss average, wall time] per checkpoint

    def _compiled(self, net: torch.nn.Module) -> torch.nn.Module:
        return cast(torch.nn.Module, torch.compile(net)) if self.s.compile else net

    def _new_optimizer(self) -> torch.optim.Adam:
        return torch.optim.Adam(self.net.parameters(), lr=self.s.lr, fused=self.device.type == "cuda")

    @property
    def total_steps(self) -> int:
        return self.s.rounds() * self.s.round_steps

    @property
    def round_index(self) -> int:
        return min(self.step // self.s.round_steps, self.s.rounds() - 1)

    @property
    def local_step(self) -> int:
        return self.step - self.round_index * self.s.round_steps

    def student_steps(self) -> int:
        return self.s.student_steps(self.round_index)

    # ---- one step -------------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, eps, i): training images, their noise, a step of the student's grid per image."""
        idx = torch.randint(0, self.images.shape[0], (self.s.batch,), generator=self.g_data)
        x0 = to_model_range(self.images[idx.to(self.images.device)]).to(self.device)
        eps = torch.randn(x0.shape, generator=self.g_noise, device=self.device)
        i = torch.randint(0, self.student_steps(), (self.s.batch,), generator=self.g_noise, device=self.device)
        return x0, eps, i

    def train_step(self) -> float:
        x0, eps, i = self.batch()
        for group in self.opt.param_groups:
            group["lr"] = lr_schedule(
                self.local_step, self.s.lr, self.s.warmup, self.s.round_steps, self.s.lr_schedule, self.s.lr_min_ratio
            )
        b = make_targets(
            self.teacher_fn, x0, eps, i, self.student_steps(), self.s.schedule, self.s.substeps(self.round_index)
        )
        self.net.train()
        loss = distill_loss(self.student_fn, b).mean()
        value = optimizer_step(loss, self.net, self.opt, self.s.grad_clip, "lower --lr", self.step)
        update_ema(self.ema, self.net, ema_decay(self.local_step, self.s.ema))
        self.step += 1
        self.loss_avg = running_mean(self.loss_avg, value)
        return value

    def next_round(self) -> None:
        """The finished round's student (EMA) becomes the teacher and the start of the next student;
        a fresh optimizer and loss average for the new problem."""
        weights = self.ema.state_dict()
        self.teacher.load_state_dict(weights)
        self.net.load_state_dict(weights)
        self.opt = self._new_optimizer()
        self.loss_avg = float("nan")

    # ---- checkpoints ----------------------------------------------------------------------------
    def _parts(self) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Generator]]:
        return {"teacher": self.teacher, "net": self.net, "ema": self.ema}, {"data": self.g_data, "noise": self.g_noise}

    def save_checkpoint(self, folder: Path) -> None:
        modules, generators = self._parts()
        state = {
            "step": self.step,
            "wall_time": self.wall_time,
            "loss_avg": self.loss_avg,
            "settings": asdict(self.s),
            "rounds": self.history,
            "curve": self.curve,
            "done": self.step >= self.total_steps,
        }
        save_checkpoint(folder, modules, self.opt, generators, state)

    def load_checkpoint(self, folder: Path) -> None:
        state, tensors = read_checkpoint(folder)
        check_settings(state["settings"], self.s, DistillSettings.TRAJECTORY, folder / CHECKPOINT_STATE)
        modules, generators = self._parts()
        restore(state, tensors, modules, self.opt, generators)
        self.step, self.wall_time, self.loss_avg = state["step"], state["wall_time"], state["loss_avg"]
        self.history, self.curve = state["rounds"], state.get("curve", [])

    # ---- the model folders ----------------------------------------------------------------------
    def student_name(self, steps: int) -> str:
        return f"{self.s.name or self.teacher_name}-{steps}step"

    def export(self, folder: Path, r: int) -> Path:
        """Round r's student (the EMA weights, at the end of the round) as a model folder."""
        steps = self.s.student_steps(r)
        facts = {
            "method": "progressive distillation (Salimans & Ho 2022), x0 and eps heads",
            "teacher": self.teacher_name,
            "teacher_path": str(self.s.teacher),
            "teacher_training_steps": self.teacher_config.get("training", {}).get("steps"),
            "data": str(self.s.data),
            "num_images": int(self.images.shape[0]),
            "round": r + 1,
            "round_steps": self.s.round_steps,
            "first_substeps": self.s.first_substeps,
            "steps": self.step - r * self.s.round_steps,
            "batch": self.s.batch,
            "lr": self.s.lr,
            "warmup": self.s.warmup,
            "lr_schedule": self.s.lr_schedule,
            "lr_min_ratio": self.s.lr_min_ratio,
            "ema": self.s.ema,
            "grad_clip": self.s.grad_clip,
            "seed": self.s.seed,
            "loss": "max(cot^2 eta, 1) mse(x0) + mse(eps)",
            "compile": self.s.compile,
            "wall_time_s": round(self.wall_time, 1),  # of the run so far, every round up to this one
            "final_loss_ema": round(self.loss_avg, 5),
            "hardware": hardware_description(self.device),
            "torch": torch.__version__,
            "parameters": count_parameters(self.net),
        }
        distilled = Distilled(
            teacher=self.teacher_name,
            steps=steps,
            solver=SOLVER,
            schedule=self.s.schedule,
            rounds=r + 1,
            teacher_steps=self.s.teacher_steps,
        )
        name = self.student_name(steps)
        cfg = make_config(name, self.unet_config, "x0_eps", facts, distilled)
        return save_model(folder / name, self.ema, cfg)


def distill(
    settings: DistillSettings,
    resume: bool = False,
    progress: bool = True,
    images: torch.Tensor | None = None,
    stop_after: int | None = None,
    on_step: Callable[[Distiller], None] | None = None,
    log: bool = False,
) -> list[Path]:
    """Run (or continue) the rounds; returns the model folders of the rounds finished so far.
    `stop_after`: at most this many steps in this call, then a checkpoint (a chunk of a long run).
    `log`: without a progress bar, print a line per checkpoint and per round (the command's --quiet)."""
    out = Path(settings.out)
    d = Distiller(settings, images)
    if resume and (out / CHECKPOINT_STATE).is_file():
        d.load_checkpoint(out)
    elif not resume and (out / CHECKPOINT_STATE).is_file():
        raise TrainingError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    from tqdm import tqdm

    total = d.total_steps
    end = total if stop_after is None else min(total, d.step + stop_after)
    bar = tqdm(total=total, initial=d.step, disable=not progress, unit="step", dynamic_ncols=True)
    start, wall_start = d.step, d.wall_time

    def say(line: str) -> None:
        if progress:
            bar.write(line)
        elif log:
            print(line, flush=True)

    t_last = time.perf_counter()
    while d.step < end:
        d.train_step()
        now = time.perf_counter()
        d.wall_time += now - t_last
        if progress:
            bar.update(1)
            bar.set_postfix(
                student=f"{d.student_steps()}step",
                loss=f"{d.loss_avg:.4f}",
                img_s=f"{settings.batch / (now - t_last):.0f}",
            )
        t_last = now
        if on_step is not None:
            on_step(d)
        round_done = d.step % settings.round_steps == 0
        if round_done or d.step % settings.checkpoint_every == 0 or d.step == end:
            # the curve and the log line first: a round's end resets the loss average
            n = settings.student_steps((d.step - 1) // settings.round_steps)
            d.curve.append([d.step, n, round(d.loss_avg, 6), round(d.wall_time, 1)])
            if not progress:  # a line per checkpoint, for logs
                rate = (d.step - start) / max(d.wall_time - wall_start, 1e-9)
                say(f"step {d.step}/{total} ({n}-step student): loss {d.loss_avg:.5f}, {rate:.2f} steps/s")
        if round_done:
            finished = d.step // settings.round_steps - 1
            steps = settings.student_steps(finished)
            folder = d.export(out, finished)
            d.history.append(
                {
                    "steps": steps,
                    "model": folder.name,
                    "final_loss_ema": round(d.loss_avg, 5),
                    "wall_time_s": round(d.wall_time, 1),
                }
            )
            say(f"round {len(d.history)}: {steps}-step student written to {folder} (loss {d.loss_avg:.5f})")
            if d.step < total:
                d.next_round()
        if round_done or d.step % settings.checkpoint_every == 0 or d.step == end:
            d.save_checkpoint(out)
            t_last = time.perf_counter()  # checkpoint I/O is not training time
    bar.close()
    return [out / r["model"] for r in d.history]
