"""The model catalogue without torch: what a models folder serves, read from config.json and the
safetensors header alone (both JSON), so the API process lists, validates and answers about
models without importing torch. arcdiff.model.registry adds loading on top (it needs torch).

Each direct subfolder holding an arcdiff model (config.json + model.safetensors) or a diffusers
UNet2DModel folder is a model named after the folder. Names come from the folder listing only;
a name from a request is looked up in that listing and never joined onto a path.

The model format itself is described in arcdiff.model.format; the checks of config.json live here
so that the API and the worker agree on which folders are models.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arcdiff.model.solver_names import GRIDS, SOLVERS, resolve
from arcdiff.model.unet_config import UNetConfig

FORMAT = "arcdiff-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREDICTIONS: tuple[str, ...] = ("x0_eps", "eps", "x0", "v")

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "weights"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# diffusers folders: the scheduler's prediction_type -> ours, and the one weights file read
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class ModelFormatError(ValueError):
    """A model folder that cannot be loaded: the message names the file and the problem."""


def heads_for(prediction: str) -> int:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    return 2 if prediction == "x0_eps" else 1


@dataclass(frozen=True)
class Distilled:
    """A distilled student's "distilled" object: what it was distilled from and how to sample it."""

    teacher: str
    steps: int
    solver: str
    schedule: str
    rounds: int | None = None
    teacher_steps: int | None = None
    # measured quality beside the teacher's, as `arcdiff eval sets` reports it (None: not measured)
    quality: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"teacher": self.teacher, "steps": self.steps, "solver": self.solver}
        out["schedule"] = self.schedule
        if self.rounds is not None:
            out["rounds"] = self.rounds
        if self.teacher_steps is not None:
            out["teacher_steps"] = self.teacher_steps
        if self.quality is not None:
            out["quality"] = self.quality
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
    if d.get("quality") is not None and not isinstance(d["quality"], dict):
        raise ModelFormatError(f"{path}: 'distilled.quality' must be an object, got {type(d['quality']).__name__}")
    return Distilled(
        d["teacher"], d["steps"], d["solver"], d["schedule"], d.get("rounds"), d.get("teacher_steps"), d.get("quality")
    )


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


# bytes per element of the safetensors dtypes (the format's own list)
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header's size


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets), checked
    as the safetensors library checks it on opening: the header parses, every tensor's byte range
    matches its dtype and shape, and the ranges fill the data section up to the end of the file
    (so a truncated file, or a pickle in its place, is refused here, without torch)."""
    if not path.is_file():
        raise ModelFormatError(f"{path}: file is missing")
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} is too large")
            raw = f.read(n)
            if len(raw) < n:
                raise ValueError("the header is cut short")
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        data_size = path.stat().st_size - 8 - n
        ranges = []
        for name, t in header.items():
            if name == "__metadata__":
                continue
            shape, (begin, end) = t["shape"], t["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError(f"tensor {name!r} has a bad shape {shape}")
                numel *= d
            if end - begin != numel * _DTYPE_BYTES[t["dtype"]]:
                raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {t['dtype']}")
            ranges.append((begin, end))
        ranges.sort()
        at = 0
        for begin, end in ranges:
            if begin != at:
                raise ValueError("the tensors' byte ranges leave a gap or overlap")
            at = end
        if at != data_size:
            raise ValueError(f"the tensors need {at} bytes of data, the file has {data_size}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read safetensors ({e})") from None
    return header


def weight_parameter_count(path: Path) -> int:
    """Number of parameters in a safetensors file, read from its header alone."""
    total = 0
    for name, t in safetensors_header(path).items():
        if name != "__metadata__":
            n = 1
            for d in t["shape"]:
                n *= d
            total += n
    return total


# ---- diffusers folders ---------------------------------------------------------------------------


def is_diffusers_folder(folder: Path) -> bool:
    if (folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file():
        return True
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            return read_json(cfg).get("_class_name") == "UNet2DModel"
        except ModelFormatError:
            return False
    return False


def diffusers_paths(folder: Path) -> tuple[Path, Path | None]:
    """(unet folder, scheduler config file or None) for a pipeline folder or a bare UNet folder."""
    if (folder / "unet" / "config.json").is_file():
        sched = folder / "scheduler" / "scheduler_config.json"
        return folder / "unet", sched if sched.is_file() else None
    sched = folder / "scheduler_config.json"
    return folder, sched if sched.is_file() else None


def read_diffusers_config(folder: Path) -> dict[str, Any]:
    """An arcdiff-style config dict describing a diffusers folder (no weights loaded)."""
    unet_dir, sched_path = diffusers_paths(folder)
    ucfg = read_json(unet_dir / "config.json")
    if ucfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ModelFormatError(
            f"{unet_dir / 'config.json'}: only UNet2DModel is supported, got {ucfg.get('_class_name')!r}"
        )
    sched = read_json(sched_path) if sched_path else {}
    ptype = sched.get("prediction_type", "epsilon")
    if ptype not in DIFFUSERS_PREDICTIONS:
        raise ModelFormatError(
            f"{sched_path}: prediction_type {ptype!r} is not supported ({', '.join(DIFFUSERS_PREDICTIONS)})"
        )
    size = ucfg.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ModelFormatError(f"{unet_dir / 'config.json'}: only square images are supported, got {size}")
        size = size[0]
    weights = unet_dir / DIFFUSERS_WEIGHTS
    if not weights.is_file():
        raise ModelFormatError(f"{weights}: file is missing (only safetensors weights are loaded)")
    return {
        "format": "diffusers",
        "name": folder.name,
        "image_size": int(size),
        "channels": int(ucfg.get("in_channels", 3)),
        "prediction": DIFFUSERS_PREDICTIONS[ptype],
        "schedule": {
            "type": "diffusers",
            "beta_schedule": sched.get("beta_schedule", "linear"),
            "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
        },
        "data_range": [-1.0, 1.0],
        "parameters": weight_parameter_count(weights),
        "training": {"source": "diffusers", "scheduler": sched_path.name if sched_path else None},
    }


# ---- the catalogue -------------------------------------------------------------------------------


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
        read_distilled(cfg, folder / CONFIG_FILE) if kind == "arcdiff" else None,
    )


class ModelCatalog:
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
                (folder / CONFIG_FILE).is_file() or is_diffusers_folder(folder)
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
