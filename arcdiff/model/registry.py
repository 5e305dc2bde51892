"""Find models by name in a models folder (ARCDIFF_MODEL_DIR, default: the ones shipped here).

Each direct subfolder holding an arcdiff model (config.json + model.safetensors) or a diffusers
UNet2DModel folder is a model named after the folder. Names come from the folder listing only;
a name from a request is looked up in that listing and never joined onto a path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arcdiff.model.diffusers_adapter import is_diffusers_folder, load_diffusers_model, read_diffusers_config
from arcdiff.model.format import (
    WEIGHTS_FILE,
    Distilled,
    LoadedModel,
    ModelFormatError,
    load_model,
    read_config,
    read_distilled,
    weight_parameter_count,
)
from arcdiff.model.solver_names import resolve

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "weights"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_model_dir() -> Path:
    env = os.environ.get("ARCDIFF_MODEL_DIR", "")
    return Path(env) if env else SHIPPED_MODEL_DIR


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    kind: str  # "arcdiff" or "diffusers"
    image_size: int
    channels: int
    prediction: str
    parameters: int
    config: dict[str, Any]
    # a few-step student (`arcdiff distill`): its teacher, the step count, solver and grid it was
    # distilled for; a request for it that names no steps gets these (None: not distilled)
    distilled: Distilled | None = None

    def resolve(self, solver: str | None, steps: int | None, schedule: str | None) -> tuple[str, int, str]:
        """A request's (solver, steps, schedule) for this model with the defaults filled in. A
        distilled student fills what the request leaves out with what it was distilled for (its
        solver, step count and grid) as long as the request names no other solver; every other
        model gets solver_names.resolve's measured defaults."""
        d = self.distilled
        if d is not None and solver in (None, d.solver):
            return d.solver, steps if steps is not None else d.steps, schedule or d.schedule
        return resolve(solver, steps, schedule)


def describe(folder: Path) -> ModelInfo:
    """Read a model folder's description without loading its weights."""
    if is_diffusers_folder(folder):
        cfg = read_diffusers_config(folder)
        kind, params = "diffusers", cfg["parameters"]
    else:
        cfg = read_config(folder)
        kind, params = "arcdiff", weight_parameter_count(folder / WEIGHTS_FILE)
    return ModelInfo(
        folder.name,
        folder,
        kind,
        int(cfg["image_size"]),
        int(cfg["channels"]),
        cfg["prediction"],
        params,
        cfg,
        read_distilled(cfg, folder / "config.json") if kind == "arcdiff" else None,
    )


class ModelRegistry:
    """The models in one folder, by name. Folders that fail to describe are kept in `errors`."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_model_dir()
        self.models: dict[str, ModelInfo] = {}
        self.errors: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> None:
        self.models, self.errors = {}, {}
        if not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not NAME_PATTERN.match(folder.name) or not (
                (folder / "config.json").is_file() or is_diffusers_folder(folder)
            ):
                continue
            try:
                self.models[folder.name] = describe(folder)
            except ModelFormatError as e:
                self.errors[folder.name] = str(e)

    def names(self) -> list[str]:
        return sorted(self.models)

    def info(self, name: str) -> ModelInfo:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown model {name!r}; known models: {known}") from None

    def load(self, name: str, device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None) -> LoadedModel:
        info = self.info(name)
        loader = load_diffusers_model if info.kind == "diffusers" else load_model
        return loader(info.path, device=device, amp_dtype=amp_dtype)
