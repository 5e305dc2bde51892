"""The model format: a folder named after the model holding config.json and model.safetensors.

config.json:
    format          "arcdiff-model" (format_version 1)
    name            the model's name (also the folder's)
    architecture    {"type": "unet", ...UNetConfig fields}
    image_size, channels
    prediction      "x0_eps" (two heads), "eps", "x0" or "v"
    schedule        {"type": "angle"}: trained on eta ~ U(0, pi/2)
    data_range      [-1, 1]: what pixel values map to (used to clip derived x0 and to write PNGs)
    training        facts about how the weights were made (data, steps, objective, ...)
    distilled       optional, a few-step student only (`arcdiff distill`): {"teacher": the model it
                    was distilled from, "teacher_steps": that model's DDIM steps it started from,
                    "steps": the step count it was distilled for, "solver": "ddim", "schedule": the
                    time grid, "rounds": distillation rounds it took}; sample it with that
                    solver, grid and step count

Weights are read with safetensors only (never pickle). Every failure names the file and what is
wrong with it. Reading and checking config.json and the weights' header needs no torch: that half
lives in arcdiff.model.catalog (the API's model list) and is re-exported here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# the format's torch-free half (reading and checking config.json, the weights' header), re-exported
from arcdiff.model.catalog import (  # noqa: F401
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    Distilled,
    ModelFormatError,
    read_config,
    read_distilled,
    read_json,
    weight_parameter_count,
)
from arcdiff.model.denoiser import Denoiser
from arcdiff.model.unet import UNet, UNetConfig


@dataclass
class LoadedModel:
    name: str
    path: Path | None  # its folder; None for one made in memory (a benchmark's random network)
    config: dict[str, Any]
    denoiser: torch.nn.Module  # (x, eta) -> (x0_hat, eps_hat)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config["channels"], self.config["image_size"], self.config["image_size"])


def make_config(
    name: str,
    unet: UNetConfig,
    prediction: str,
    training: dict | None = None,
    distilled: Distilled | None = None,
) -> dict[str, Any]:
    extra = {"distilled": distilled.to_dict()} if distilled is not None else {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": {"type": "unet", **unet.to_dict()},
        "image_size": unet.image_size,
        "channels": unet.channels,
        "prediction": prediction,
        "schedule": {"type": "angle"},
        "data_range": [-1.0, 1.0],
        "training": training or {},
        **extra,
    }


def save_model(folder: str | os.PathLike, net: UNet, config: dict[str, Any]) -> Path:
    """Write config.json and model.safetensors (float32, contiguous) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "name": config.get("name", "")})
    os.replace(tmp, folder / WEIGHTS_FILE)
    os.chmod(folder / WEIGHTS_FILE, 0o644)  # readable by the service's non-root user
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing or damaged file raises ModelFormatError."""
    if not path.is_file():
        raise ModelFormatError(f"{path}: file is missing")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            names = f.keys()  # a safetensors file handle, not a dict: it has keys() but no __iter__
            return {k: f.get_tensor(k) for k in names}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelFormatError(f"{path}: cannot read safetensors ({e})") from None


def load_state(net: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy tensors into net, failing with the names of missing, unexpected and misshapen keys."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[:2]})")
    if problems:
        raise ModelFormatError(f"{path}: weights do not match the architecture in config.json: " + "; ".join(problems))
    net.load_state_dict(tensors)


def build_network(cfg: dict[str, Any]) -> UNet:
    return UNet(UNetConfig.from_dict(cfg["architecture"]))


def load_model(
    folder: str | os.PathLike, device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load an arcdiff model folder as a denoiser in eval mode on `device`."""
    folder = Path(folder)
    cfg = read_config(folder)
    net = build_network(cfg)
    load_state(net, read_weights(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    net = net.to(device).eval()
    lo, hi = cfg.get("data_range", [-1.0, 1.0])
    denoiser = Denoiser(net, cfg["prediction"], clip=max(abs(lo), abs(hi)), amp_dtype=amp_dtype).eval()
    return LoadedModel(name=cfg.get("name", folder.name), path=folder, config=cfg, denoiser=denoiser)
