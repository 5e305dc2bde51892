"""Per-image random streams: an image's noise depends only on its own seed, never on its batch."""

from __future__ import annotations

import torch

SEED_MAX = 2**32 - 1


def image_seed(request_seed: int, index: int) -> int:
    """Image k of a request with seed S has seed (S + k) mod 2^32: asking for that seed with n = 1
    reproduces the image on its own."""
    return (request_seed + index) % (SEED_MAX + 1)


def image_generator(seed: int) -> torch.Generator:
    """A CPU generator for one image (noise is drawn on the CPU, so an image is the same on any device)."""
    return torch.Generator(device="cpu").manual_seed(seed)


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x_T for one image: standard normal of `shape` (C, H, W), from the image's own generator."""
    return torch.randn(shape, generator=generator, dtype=dtype)
