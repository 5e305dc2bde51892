"""Serve a locally saved diffusers UNet2DModel (noise or v prediction) through every solver here.

A diffusers DDPM/DDIM checkpoint is a network eps_theta(x_t, t) (or v_theta) trained on a discrete
schedule alpha_bar_t, t = 0..T-1. Since x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps is
the point at angle eta_t = arccos(sqrt(alpha_bar_t)), the network already lives on the eta axis:
we ask it about an angle eta at the fractional timestep where the schedule's angle equals eta
(linear between table entries, clamped to the trained range), and derive the other estimate with
the same adapter as a native single-head model.

diffusers is an optional extra (`pip install arcdiff[diffusers]`); nothing is fetched from a hub:
the folder must hold the weights (safetensors) and configs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arcdiff.model.catalog import (  # noqa: F401  (is_diffusers_folder, read_diffusers_config: re-exported)
    DIFFUSERS_PREDICTIONS,
    DIFFUSERS_WEIGHTS,
    ModelFormatError,
    diffusers_paths,
    is_diffusers_folder,
    read_diffusers_config,
    read_json,
)
from arcdiff.model.denoiser import Denoiser
from arcdiff.model.format import LoadedModel
from arcdiff.model.schedule import (
    alpha_bar_from_betas,
    cosine_alpha_bar,
    eta_from_alpha_bar,
    eta_to_timestep,
    linear_betas,
    scaled_linear_betas,
)

PREDICTION_TYPES = DIFFUSERS_PREDICTIONS
UNET_WEIGHTS = DIFFUSERS_WEIGHTS


def alpha_bar_from_scheduler(sched: dict[str, Any], path: Path | None) -> torch.Tensor:
    """alpha_bar for t = 0..T-1 from a diffusers scheduler config (DDPM/DDIM conventions)."""
    T = int(sched.get("num_train_timesteps", 1000))
    kind = sched.get("beta_schedule", "linear")
    if sched.get("trained_betas"):
        betas = torch.tensor(sched["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = linear_betas(T, sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02))
    elif kind == "scaled_linear":
        betas = scaled_linear_betas(T, sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012))
    elif kind == "squaredcos_cap_v2":
        return cosine_alpha_bar(T)
    else:
        raise ModelFormatError(
            f"{path}: beta_schedule {kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
        )
    return alpha_bar_from_betas(betas)


def with_fixed_dtype(unet: nn.Module) -> nn.Module:
    """The same UNet, whose `dtype` is computed when it is loaded or moved instead of per call.

    diffusers' ModelMixin.dtype walks every submodule and parameter, and UNet2DModel.forward reads
    it once per call: Python time per network evaluation that is a visible share of a small UNet's
    forward at batch 1 (figures: docs/performance.md#figures-behind-the-defaults). The value can
    only change through .to()/.half()/..., which all go through _apply, so it is recomputed there."""
    base = type(unet)
    if getattr(base, "_arcdiff_fixed_dtype", False):
        return unet
    from diffusers.models.modeling_utils import get_parameter_dtype

    def _apply(self: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
        out = base._apply(self, fn, *args, **kwargs)
        self._arcdiff_dtype = get_parameter_dtype(self)  # type: ignore[assignment]  # torch types Module.__setattr__ for tensors/modules only
        return out

    fixed = type(
        base.__name__,
        (base,),
        {"_arcdiff_fixed_dtype": True, "_apply": _apply, "dtype": property(lambda self: self._arcdiff_dtype)},
    )
    unet.__class__ = fixed
    unet._arcdiff_dtype = get_parameter_dtype(unet)  # type: ignore[assignment]  # as in _apply above
    return unet


class DiffusersNet(nn.Module):
    """net(x, eta) -> UNet2DModel(x, t(eta)).sample, t the fractional timestep of angle eta."""

    etas: torch.Tensor  # a buffer; nn.Module.__getattr__ is typed Tensor | Module

    def __init__(self, unet: nn.Module, alpha_bar: torch.Tensor):
        super().__init__()
        self.unet = with_fixed_dtype(unet)
        self.register_buffer("etas", eta_from_alpha_bar(alpha_bar).to(torch.float64), persistent=False)

    def forward(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        t = eta_to_timestep(eta, self.etas).to(torch.float32)
        return self.unet(x, t).sample


def load_diffusers_model(
    folder: str | os.PathLike, device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None
) -> LoadedModel:
    folder = Path(folder)
    cfg = read_diffusers_config(folder)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ModelFormatError(
            f"{folder}: is a diffusers model, but diffusers is not installed (pip install 'arcdiff[diffusers]')"
        ) from None
    unet_dir, sched_path = diffusers_paths(folder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only; never reach for a hub
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except Exception as e:
        raise ModelFormatError(f"{unet_dir}: diffusers could not load the UNet ({e})") from None
    alpha_bar = alpha_bar_from_scheduler(read_json(sched_path) if sched_path else {}, sched_path)
    net = DiffusersNet(unet, alpha_bar).to(device).eval()
    denoiser = Denoiser(net, cfg["prediction"], clip=1.0, amp_dtype=amp_dtype).eval()
    return LoadedModel(name=folder.name, path=folder, config=cfg, denoiser=denoiser)
