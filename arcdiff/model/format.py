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
                    time grid, "rounds": halvings from teacher_steps to steps}; sample it with that
                    solver, grid and step count

Weights are read with safetensors only (never pickle). Every failure names the file and what is
wrong with it.
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

from arcdiff.model.denoiser import PREDICTIONS, Denoiser, heads_for
from arcdiff.model.solver_names import GRIDS, SOLVERS
from arcdiff.model.unet import UNet, UNetConfig

FORMAT = "arcdiff-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ModelFormatError(ValueError):
    """A model folder that cannot be loaded: the message names the file and the problem."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: dict[str, Any]
    denoiser: torch.nn.Module  # (x, eta) -> (x0_hat, eps_hat)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config["channels"], self.config["image_size"], self.config["image_size"])


@dataclass(frozen=True)
class Distilled:
    """A distilled student's "distilled" object: what it was distilled from and how to sample it."""

    teacher: str
    steps: int
    solver: str
    schedule: str
    rounds: int | None = None
    teacher_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"teacher": self.teacher, "steps": self.steps, "solver": self.solver}
        out["schedule"] = self.schedule
        if self.rounds is not None:
            out["rounds"] = self.rounds
        if self.teacher_steps is not None:
            out["teacher_steps"] = self.teacher_steps
        return out


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_distilled(cfg: dict[str, Any], path: Path | str = CONFIG_FILE) -> Distilled | None:
    """The config's "distilled" object (None for a model that was not distilled); a malformed one
    raises ModelFormatError naming the field."""
    d = cfg.get("distilled")
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ModelFormatError(f"{path}: 'distilled' must be an object, got {type(d).__name__}")
    if not isinstance(d.get("teacher"), str) or not d["teacher"]:
        raise ModelFormatError(f"{path}: 'distilled.teacher' must be a model name")
    if not _positive_int(d.get("steps")):
        raise ModelFormatError(f"{path}: 'distilled.steps' must be a positive integer, got {d.get('steps')!r}")
    if d.get("solver") not in SOLVERS:
        raise ModelFormatError(f"{path}: 'distilled.solver' is {d.get('solver')!r}, expected one of {SOLVERS}")
    if d.get("schedule") not in GRIDS:
        raise ModelFormatError(f"{path}: 'distilled.schedule' is {d.get('schedule')!r}, expected one of {GRIDS}")
    for key in ("rounds", "teacher_steps"):
        if d.get(key) is not None and not _positive_int(d[key]):
            raise ModelFormatError(f"{path}: 'distilled.{key}' must be a positive integer, got {d[key]!r}")
    return Distilled(d["teacher"], d["steps"], d["solver"], d["schedule"], d.get("rounds"), d.get("teacher_steps"))


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


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFormatError(f"{path}: file is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    cfg = read_json(path)
    if cfg.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: 'format' is {cfg.get('format')!r}, expected {FORMAT!r}")
    for key in ("architecture", "image_size", "channels", "prediction"):
        if key not in cfg:
            raise ModelFormatError(f"{path}: missing field {key!r}")
    if cfg["prediction"] not in PREDICTIONS:
        raise ModelFormatError(f"{path}: 'prediction' is {cfg['prediction']!r}, expected one of {PREDICTIONS}")
    arch = cfg["architecture"]
    if not isinstance(arch, dict) or arch.get("type") != "unet":
        raise ModelFormatError(f"{path}: 'architecture.type' must be 'unet'")
    try:
        unet = UNetConfig.from_dict(arch)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{path}: bad architecture ({e})") from None
    if unet.heads != heads_for(cfg["prediction"]):
        raise ModelFormatError(
            f"{path}: prediction {cfg['prediction']!r} needs {heads_for(cfg['prediction'])} head(s), "
            f"architecture has {unet.heads}"
        )
    if (unet.image_size, unet.channels) != (cfg["image_size"], cfg["channels"]):
        raise ModelFormatError(f"{path}: image_size/channels disagree with the architecture")
    read_distilled(cfg, path)  # validates
    return cfg


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
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelFormatError(f"{path}: cannot read safetensors ({e})") from None


def weight_parameter_count(path: Path) -> int:
    """Number of parameters in a safetensors file, read from its header alone."""
    total = 0
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                total += n
    except Exception as e:
        raise ModelFormatError(f"{path}: cannot read safetensors ({e})") from None
    return total


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
