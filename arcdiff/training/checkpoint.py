"""What a training run needs to continue bit for bit, shared by `arcdiff train` and `arcdiff distill`.

A run folder holds `checkpoint.safetensors` (every tensor: networks by prefix, the Adam moments,
the generators' states) and `checkpoint.json` (the step, the settings, the optimizer's scalars and
param groups, and whatever else the run keeps). No pickle anywhere. Both files are written to a
temporary name and renamed, tensors first, so a state file always has its tensors.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


class TrainingError(RuntimeError):
    pass


def lr_schedule(step: int, lr: float, warmup: int, steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up to lr, then constant (the EMA does the averaging) or a cosine decay that
    reaches min_ratio * lr at `steps` (so with cosine the step count is part of the run)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "cosine" and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr * warm


def ema_decay(step: int, ema: float) -> float:
    """EMA decay with the usual ramp, so early weights do not dominate a short run."""
    return min(ema, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    # one fused op over all tensors (a kernel per parameter would dominate a GPU step of a small net)
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers(), strict=True):
        e.copy_(b)


def optimizer_step(
    loss: torch.Tensor, net: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float, hint: str, step: int
) -> float:
    """One optimiser step on `loss` (gradients clipped to `grad_clip` when positive); its value.
    A non-finite loss stops the run with `hint` (what to change) instead of corrupting the weights."""
    if not torch.isfinite(loss):
        raise TrainingError(f"loss is {loss.item()} at step {step}: {hint}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    return loss.item()


def running_mean(average: float, value: float) -> float:
    """The loss shown on the progress bar: an exponential average, started at the first value."""
    return value if math.isnan(average) else 0.98 * average + 0.02 * value


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def save_checkpoint(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
) -> None:
    """Write the networks (under `<prefix>.`), the optimizer (`opt.`), the generators (`rng.<name>`)
    and `state` (JSON: step, settings, ...) atomically into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{prefix}.{k}"] = v
    opt_state = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    for name, g in generators.items():
        tensors[f"rng.{name}"] = g.get_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    state = {**state, "param_groups": opt_state["param_groups"], "opt_scalars": scalars}
    tmp_t, tmp_j = folder / (CHECKPOINT_TENSORS + ".tmp"), folder / (CHECKPOINT_STATE + ".tmp")
    save_file(tensors, str(tmp_t))
    tmp_j.write_text(json.dumps(state, indent=1))
    os.replace(tmp_t, folder / CHECKPOINT_TENSORS)  # tensors first: a state file always has its tensors
    os.replace(tmp_j, folder / CHECKPOINT_STATE)


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state, tensors) of the checkpoint in `folder`."""
    try:
        state = json.loads((folder / CHECKPOINT_STATE).read_text())
        tensors = load_file(str(folder / CHECKPOINT_TENSORS))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{folder}: cannot read checkpoint ({e})") from None
    return state, tensors


def check_settings(saved: dict[str, Any], settings: Any, trajectory: tuple[str, ...], where: Path) -> None:
    """Refuse a resume whose settings in `trajectory` differ from the checkpoint's: it would not
    continue the same run. A setting newer than the checkpoint was, by construction, at its default."""
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(settings)}
    changed = [k for k in trajectory if saved.get(k, defaults[k]) != getattr(settings, k)]
    if changed:
        diffs = ", ".join(
            f"{k}: checkpoint {saved.get(k, defaults[k])!r}, now {getattr(settings, k)!r}" for k in changed
        )
        raise TrainingError(f"{where}: cannot resume with different settings ({diffs})")


def restore(
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    modules: dict[str, torch.nn.Module],
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> None:
    """Load what save_checkpoint wrote back into the networks, the optimizer and the generators."""
    for prefix, module in modules.items():
        n = len(prefix) + 1
        module.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    device = next(next(iter(modules.values())).parameters()).device  # where the optimizer state lives
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v.to(device)
    for k, v in state["opt_scalars"].items():
        pid, name = k.split(".", 1)
        opt_state["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(opt_state)
    for name, g in generators.items():
        t = tensors[f"rng.{name}"]
        g.set_state(t.to(g.device) if g.device.type != "cpu" else t)
