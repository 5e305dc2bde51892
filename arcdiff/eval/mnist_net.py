"""The project's MNIST feature network: a small digit classifier trained here on 2 CPU cores.

FID on MNIST with Inception-v3 (ImageNet features of upsampled grayscale digits) says little,
so, as is common for MNIST, a classifier trained on the digits gives the features:

    28x28 -> conv 16, pool -> 14x14 -> conv 32, pool -> 7x7 -> conv 64 -> fc 128 -> fc 10
    pooled features  = the 128-d penultimate layer (after ReLU)        -> FID, precision/recall
    spatial features = the first 16 channels of the 7x7 conv-64 map    -> sFID (784-d; like
                       ADM's sFID, which keeps 7 channels of Inception's 17x17 mixed_6/conv)
    softmax          -> "is this a recognisable digit" (confidence > 0.9)

Weights ship as arcdiff/eval/weights/mnist_features.safetensors with a JSON of facts beside them;
`arcdiff train-features` remakes them.

The same module makes the second judge, a classifier of another kind on which no sampler, grid or
default of the project was ever chosen (`--features judge` in `arcdiff eval sets`):

    28x28 -> flatten 784 -> fc 512 -> fc 256 -> fc 10            (kind "mlp", weights mnist_judge)
    pooled features  = the 256-d second hidden layer (after ReLU)
    spatial features = the 512-d first hidden layer (after ReLU)

A perceptron sees no translation invariance and no local filters, so where the CNN's features
forgive a stroke in the wrong place, its features do not: the two disagree where a sampler's
errors are of a kind one of them is blind to. `arcdiff train-features --kind mlp` remakes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arcdiff.eval.features import FeatureError
from arcdiff.training.data import resize_images

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_NAME = "mnist_features"
WEIGHTS_NAMES = {"cnn": WEIGHTS_NAME, "mlp": "mnist_judge"}  # per network kind
KINDS = tuple(WEIGHTS_NAMES)


@dataclass(frozen=True)
class MnistNetConfig:
    kind: str = "cnn"  # cnn (the project's feature network) or mlp (the second judge)
    image_size: int = 28
    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    classes: int = 10
    spatial_channels: int = 16
    dropout: float = 0.25
    mlp_hidden: tuple[int, int] = (512, 256)  # kind "mlp": the two hidden layers

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MnistNetConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        if "mlp_hidden" in d:
            d["mlp_hidden"] = tuple(d["mlp_hidden"])
        return cls(**d)

    @property
    def pooled_dim(self) -> int:
        return self.mlp_hidden[1] if self.kind == "mlp" else self.hidden

    @property
    def spatial_dim(self) -> int:
        return self.mlp_hidden[0] if self.kind == "mlp" else self.spatial_channels * (self.image_size // 4) ** 2

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "widths": list(self.widths), "mlp_hidden": list(self.mlp_hidden)}


class MnistFeatureNet(nn.Module):
    def __init__(self, cfg: MnistNetConfig = MnistNetConfig()):
        super().__init__()
        if cfg.kind not in KINDS:
            raise ValueError(f"unknown MNIST network kind {cfg.kind!r}; expected one of {', '.join(KINDS)}")
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.kind == "mlp":
            h1, h2 = cfg.mlp_hidden
            self.mlp1 = nn.Linear(cfg.image_size**2, h1)
            self.mlp2 = nn.Linear(h1, h2)
            self.fc2 = nn.Linear(h2, cfg.classes)
            return
        w1, w2, w3 = cfg.widths
        self.conv1 = nn.Conv2d(1, w1, 3, padding=1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        side = cfg.image_size // 4
        self.fc1 = nn.Linear(w3 * side * side, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: float (N, 1, 28, 28) in [-1, 1] -> (logits (N, 10), pooled (N, pooled_dim), spatial (N, spatial_dim))."""
        if self.cfg.kind == "mlp":
            first = F.relu(self.mlp1(x.flatten(1)))
            pooled = F.relu(self.mlp2(self.dropout(first)))
            return self.fc2(self.dropout(pooled)), pooled, first
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        spatial = h[:, : self.cfg.spatial_channels].flatten(1)
        pooled = F.relu(self.fc1(h.flatten(1)))
        return self.fc2(self.dropout(pooled)), pooled, spatial


def prepare(images: torch.Tensor, image_size: int = 28) -> torch.Tensor:
    """uint8 (N, C, H, W) of any size -> float (N, 1, 28, 28) in [-1, 1] (gray, resized)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] != 1:
        images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
    return resize_images(images, image_size).float() / 127.5 - 1.0


class MnistExtractor:
    """FeatureExtractor over a trained MnistFeatureNet; also gives class probabilities."""

    def __init__(
        self,
        net: MnistFeatureNet,
        weights_sha256: str,
        facts: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.facts = facts or {}
        self.id = f"mnist-{net.cfg.kind}:{weights_sha256[:16]}"
        self.pooled_dim = net.cfg.pooled_dim
        self.spatial_dim = net.cfg.spatial_dim

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, pooled, spatial = self.net(prepare(images, self.net.cfg.image_size).to(self.device))
        return pooled.float().cpu(), spatial.float().cpu()

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        out = []
        for s in range(0, images.shape[0], batch):
            logits, _, _ = self.net(prepare(images[s : s + batch], self.net.cfg.image_size).to(self.device))
            out.append(logits.float().softmax(1).cpu())
        return torch.cat(out)


def load_mnist_extractor(
    weights: str | Path | None = None, device: str | torch.device = "cpu", kind: str = "cnn"
) -> MnistExtractor:
    """The shipped classifier of `kind` (cnn: the feature network, mlp: the second judge), or one at
    `weights` (a .safetensors file, or the folder holding <name>.safetensors + <name>.json)."""
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else WEIGHTS_DIR
    if path.is_dir():
        path = path / f"{WEIGHTS_NAMES[kind]}.safetensors"
    facts_path = path.with_suffix(".json")
    if not path.is_file() or not facts_path.is_file():
        raise FeatureError(
            f"{path}: MNIST feature network weights (and {facts_path.name}) not found; "
            f"make them with `arcdiff train-features --kind {kind} --data PATH_TO_MNIST --out arcdiff/eval/weights`"
        )
    facts = json.loads(facts_path.read_text())
    net = MnistFeatureNet(MnistNetConfig.from_dict(facts["architecture"]))
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as e:  # safetensors header errors or shape mismatches
        raise FeatureError(f"{path}: cannot load the MNIST feature network ({e})") from None
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return MnistExtractor(net, sha, facts, device=device)


# ---- training -------------------------------------------------------------------------------


def _shift(x: torch.Tensor, g: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations by up to `pixels` (background is -1): cheap augmentation that keeps a
    classifier trained on 8,000 digits from memorising positions."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    off = torch.randint(0, 2 * pixels + 1, (n, 2), generator=g)
    rows = (off[:, 0, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, c, h, w + 2 * pixels)
    cols = (off[:, 1, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    correct = 0
    for s in range(0, x.shape[0], batch):
        logits, _, _ = net(x[s : s + batch])
        correct += int((logits.argmax(1) == labels[s : s + batch]).sum())
    return correct / x.shape[0]


def fit(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 10,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    cfg: MnistNetConfig = MnistNetConfig(),
    progress: bool = False,
    desc: str = "train",
) -> MnistFeatureNet:
    """Adam with a cosine learning rate, random shifts, cross-entropy; deterministic for a seed."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = prepare(images, cfg.image_size)
    net = MnistFeatureNet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = math.ceil(x.shape[0] / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", disable=not progress, leave=False)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for s in range(0, x.shape[0], batch):
            idx = perm[s : s + batch]
            logits, _, _ = net(_shift(x[idx], g))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return net.eval()


def feature_facts(cfg: MnistNetConfig) -> dict[str, str]:
    """Which layers give the features, for the facts file."""
    if cfg.kind == "mlp":
        h1, h2 = cfg.mlp_hidden
        return {
            "pooled_features": f"second hidden layer after ReLU, {h2}-d (FID, precision/recall)",
            "spatial_features": f"first hidden layer after ReLU, {h1}-d",
        }
    side = cfg.image_size // 4
    return {
        "pooled_features": f"fc1 after ReLU, {cfg.hidden}-d (FID, precision/recall)",
        "spatial_features": f"conv3 after ReLU, first {cfg.spatial_channels} channels of the {side}x{side} map, "
        "flattened (sFID)",
    }


def train_feature_net(
    data: str | Path,
    out: str | Path = WEIGHTS_DIR,
    *,
    holdout: int = 2000,
    refit: bool = True,
    epochs: int = 10,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    kind: str = "cnn",
) -> dict[str, Any]:
    """Fit a classifier of `kind` on all but `holdout` labelled MNIST images, measure held-out
    accuracy, then (refit) fit again on all of them with the same recipe; write the weights and
    facts to `out`. Returns the facts."""
    from safetensors.torch import save_file

    from arcdiff.training.data import DataError, load_mnist

    t0 = time.time()
    images, labels = load_mnist(data)
    if labels is None:
        raise DataError(f"{data}: no MNIST labels file (*labels-idx1-ubyte[.gz]) beside the images")
    n = images.shape[0]
    if not 0 <= holdout < n:
        raise ValueError(f"holdout must be in [0, {n}), got {holdout}")
    cfg = MnistNetConfig(kind=kind)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    facts: dict[str, Any] = {"architecture": cfg.as_json()}
    if holdout:
        tr, te = perm[: n - holdout], perm[n - holdout :]
        net = fit(
            images[tr],
            labels[tr],
            epochs=epochs,
            batch=batch,
            lr=lr,
            seed=seed,
            cfg=cfg,
            progress=progress,
            desc="fit (held-out split)",
        )
        facts["holdout"] = {
            "train_images": n - holdout,
            "test_images": holdout,
            "accuracy": round(accuracy(net, prepare(images[te]), labels[te]), 4),
        }
    if refit or not holdout:
        net = fit(
            images,
            labels,
            epochs=epochs,
            batch=batch,
            lr=lr,
            seed=seed,
            cfg=cfg,
            progress=progress,
            desc="fit (all images)",
        )
    trained_on = n if (refit or not holdout) else n - holdout
    facts.update(
        {
            "trained_on_images": trained_on,
            "training_accuracy": round(accuracy(net, prepare(images), labels), 4),
            "data": str(Path(data)),
            "epochs": epochs,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "augmentation": "random shifts up to 2 px",
            **feature_facts(cfg),
            "wall_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    name = WEIGHTS_NAMES[kind]
    save_file(state, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts
