"""Samples to pixels, pixels to PNGs and grids: the one place for these conversions, used by the
worker (results), evaluation (sample grids) and the CLI (`arcdiff generate`).

Pixels are uint8 (C, H, W) per image; a batch is (B, C, H, W). torch tensors and numpy arrays are
both accepted where only pixels are handled, so the CLI's remote path works without torch."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_uint8(x: torch.Tensor, data_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """(B, C, H, W) samples in data_range -> uint8 pixels on the CPU (clipped)."""
    import torch

    lo, hi = float(data_range[0]), float(data_range[1])
    scaled = (x.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))
    return scaled.round().to(torch.uint8).cpu()


def png_bytes(pixels: torch.Tensor | np.ndarray) -> bytes:
    """One (C, H, W) uint8 image -> PNG bytes (L for one channel, RGB for three)."""
    arr = pixels.cpu().numpy() if hasattr(pixels, "cpu") else np.asarray(pixels)
    channels = arr.shape[0]
    if channels not in _MODES:
        raise ValueError(f"cannot write a PNG with {channels} channels")
    img = Image.fromarray(arr[0] if channels == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0)), _MODES[channels])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid(pixels: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, C, H, W) uint8 -> one (C, H', W') uint8 image on a black background, `nrow` images a row
    (default: square-ish), no wider than the images it holds."""
    arr = pixels.cpu().numpy() if hasattr(pixels, "cpu") else np.asarray(pixels)
    b, c, h, w = arr.shape
    nrow = min(b, nrow or max(1, math.ceil(math.sqrt(b))))
    rows = math.ceil(b / nrow)
    out = np.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[:, top : top + h, left : left + w] = arr[i]
    return out


def save_grid(pixels: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """A grid of uint8 images as a PNG file, each pixel `scale` x `scale` (nearest) for viewing."""
    g = grid(pixels, nrow)
    if scale > 1:
        g = g.repeat(scale, axis=1).repeat(scale, axis=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(g))
    return path
