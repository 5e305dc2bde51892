"""Training data from local files: MNIST IDX files, CIFAR-10 batches, or a folder of images.

Every loader reads only the path it is given (nothing is downloaded) and returns uint8 images of
shape (N, C, H, W); `to_model_range` maps them to [-1, 1]. Problems raise DataError naming the
file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class DataError(ValueError):
    """Data that cannot be read: the message names the file and the problem."""


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    return raw


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed or not, as a uint8 array."""
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header promises {expected} bytes of data for shape {dims}, file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, *patterns: str) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found += sorted(folder.glob(pattern))
    return found


def load_mnist(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MNIST images (N, 1, 28, 28) uint8 and labels (N,) if a labels file sits beside them.
    `path` is an images IDX file or a folder holding one (…images-idx3-ubyte[.gz])."""
    path = Path(path)
    if path.is_dir():
        images = _find(path, "*images-idx3-ubyte*", "*images.idx3-ubyte*")
        if not images:
            raise DataError(f"{path}: no MNIST images file (*images-idx3-ubyte[.gz]) in this folder")
        path = images[0]
    arr = read_idx(path)
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3-D IDX array (N, H, W), got shape {arr.shape}")
    labels = None
    label_files = _find(path.parent, path.name.replace("images-idx3", "labels-idx1").replace(".gz", "") + "*")
    if label_files:
        lab = read_idx(label_files[0])
        if lab.shape != (arr.shape[0],):
            raise DataError(f"{label_files[0]}: {lab.shape[0]} labels for {arr.shape[0]} images")
        labels = torch.from_numpy(lab.astype(np.int64))
    return torch.from_numpy(arr.copy())[:, None], labels


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's "python version" batches are pickles. This unpickler resolves only the names a
    plain dict of numpy arrays needs and refuses every other global, so a hostile file cannot run
    code. The binary version (data_batch_*.bin) needs no unpickling at all and is preferred."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        data, labels = d.get("data", d.get(b"data")), d.get("labels", d.get(b"labels"))
        data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        return data, np.asarray(labels, dtype=np.int64)
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None


def _cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(_read_maybe_gzip(path), dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataError(f"{path}: size {raw.size} is not a multiple of 3073 (CIFAR-10 binary records)")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def load_cifar10(path: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images (N, 3, 32, 32) uint8 and labels, from the binary or python batches in `path`."""
    path = Path(path)
    names = ["data_batch_*"] if split == "train" else ["test_batch*"]
    files = [path] if path.is_file() else _find(path, *names) or _find(path, "*/" + names[0])
    if not files:
        raise DataError(f"{path}: no CIFAR-10 batches ({names[0]}) found")
    parts = [_cifar_binary_batch(f) if f.suffix == ".bin" else _cifar_python_batch(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def load_image_folder(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """Every PNG/JPEG under `path` (recursively), center-cropped to a square and resized."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
                out[i] = np.asarray(im).reshape(image_size, image_size, channels)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: cannot read image ({e})") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    x = torch.nn.functional.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def load_images(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """Images for training a network of the given size, from whatever `path` holds: MNIST IDX
    files, CIFAR-10 batches, or a folder of images. uint8, (N, C, H, W)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    name = path.name
    if "idx3" in name or (path.is_dir() and _find(path, "*idx3-ubyte*")):
        images, _ = load_mnist(path)
    elif name.startswith(("data_batch", "test_batch")) or (
        path.is_dir() and _find(path, "data_batch_*", "*/data_batch_*")
    ):
        images, _ = load_cifar10(path)
    elif path.is_dir():
        return load_image_folder(path, image_size, channels)
    else:
        raise DataError(f"{path}: not a recognised data file (MNIST IDX, CIFAR-10 batch) or an image folder")
    if images.shape[1] != channels:
        if channels == 1:
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1).contiguous()
    return resize_images(images, image_size)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0
