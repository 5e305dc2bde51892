"""Fixtures of the evaluation tests: a tiny untrained model and made-up reference images."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """A models folder with an untrained tiny dual-head model (8x8 grayscale)."""
    from arcdiff.model.configs import get_config
    from arcdiff.model.format import make_config, save_model
    from arcdiff.model.unet import UNet

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cfg = get_config("tiny")
    save_model(root / "tiny", UNet(cfg), make_config("tiny", cfg, "x0_eps"))
    return root


@pytest.fixture(scope="module")
def blob_folder(tmp_path_factory) -> Path:
    """Made-up reference data: 48 PNGs of a bright 3x3 square on a dark 8x8 background."""
    root = tmp_path_factory.mktemp("ref")
    g = torch.Generator().manual_seed(0)
    for k in range(48):
        img = np.zeros((8, 8), dtype=np.uint8)
        i, j = torch.randint(0, 6, (2,), generator=g).tolist()
        img[i : i + 3, j : j + 3] = 255
        Image.fromarray(img).save(root / f"{k:03d}.png")
    return root
