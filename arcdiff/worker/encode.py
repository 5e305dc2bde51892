"""Samples to pixels and PNGs: one vectorised conversion on the device, PNG encoding per image."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_uint8(x: torch.Tensor, data_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """(B, C, H, W) samples in data_range -> uint8 pixels on the CPU (clipped)."""
    lo, hi = float(data_range[0]), float(data_range[1])
    scaled = (x.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))
    return scaled.round().to(torch.uint8).cpu()


def png_bytes(pixels: torch.Tensor | np.ndarray) -> bytes:
    """One (C, H, W) uint8 image -> PNG bytes (L for one channel, RGB for three)."""
    arr = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    channels = arr.shape[0]
    if channels not in _MODES:
        raise ValueError(f"cannot write a PNG with {channels} channels")
    img = Image.fromarray(arr[0] if channels == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0)), _MODES[channels])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid(pixels: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """(B, C, H, W) uint8 -> one (C, H', W') uint8 image, nrow images per row (default: square-ish)."""
    b, c, h, w = pixels.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    out = torch.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[:, top : top + h, left : left + w] = pixels[i]
    return out
