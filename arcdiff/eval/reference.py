"""Reference (real-data) features, the real-vs-real floor, and a small on-disk cache of both.

Reference features depend only on (reference data, image size, extractor), so a table of many
evals computes them once. The cache is one safetensors file per key (the features as tensors, the
key and the floor as JSON metadata): no pickle. Delete the folder to clear it.

The floor is what the metrics give for real data against real data: two disjoint random halves of
the reference set. A model cannot be expected to score better than that with these features.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arcdiff.eval.features import FeatureExtractor, extract
from arcdiff.eval.metrics import GaussianStats, fid_from_features, gaussian_stats, precision_recall
from arcdiff.training.data import DataError, load_images

CACHE_VERSION = 1
FLOOR_SEED = 0
MIN_REFERENCE = 8  # two halves of >= 4 points: k-NN with k = 3 needs 4 per set


def default_cache_dir() -> Path:
    env = os.environ.get("ARCDIFF_EVAL_CACHE", "")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", "") or str(Path.home() / ".cache")
    return Path(base) / "arcdiff" / "eval"


@dataclass
class ReferenceFeatures:
    pooled: torch.Tensor  # (N, D) float32
    spatial: torch.Tensor  # (N, D2) float32
    floor: dict[str, float]  # fid, sfid, precision, recall between two random halves; n_half
    key: dict[str, Any] = field(default_factory=dict)
    cached: bool = False  # True when read from the cache
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return int(self.pooled.shape[0])

    def stats(self, kind: str) -> GaussianStats:
        """Gaussian fit of the "pooled" or "spatial" features, computed once per process."""
        if kind not in self._memo:
            self._memo[kind] = gaussian_stats(self.pooled if kind == "pooled" else self.spatial)
        return self._memo[kind]

    def floor_at(self, k: int, seed: int = FLOOR_SEED + 1) -> tuple[float, float] | None:
        """(FID, sFID) of k random real images against the other N - k: FID is biased upwards at
        small k, and this is the score a perfect model would get with k samples. None if k > N/2."""
        if not 2 <= k <= self.count // 2:
            return None
        if ("floor_at", k) not in self._memo:
            perm = torch.randperm(self.count, generator=torch.Generator().manual_seed(seed))
            a, b = perm[:k], perm[k:]
            self._memo[("floor_at", k)] = (
                fid_from_features(self.pooled[b], self.pooled[a]),
                fid_from_features(self.spatial[b], self.spatial[a]),
            )
        return self._memo[("floor_at", k)]


def _fingerprint(path: Path) -> str:
    """Name, size and mtime of the reference file(s): changes when the data does, without
    hashing gigabytes of images on every eval."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def floor_metrics(pooled: torch.Tensor, spatial: torch.Tensor, seed: int = FLOOR_SEED) -> dict[str, float]:
    """FID, sFID, precision and recall between two disjoint random halves of real features."""
    n = pooled.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    a, b = perm[:half], perm[half : 2 * half]
    precision, recall = precision_recall(pooled[a], pooled[b])
    return {
        "fid": fid_from_features(pooled[a], pooled[b]),
        "sfid": fid_from_features(spatial[a], spatial[b]),
        "precision": precision,
        "recall": recall,
        "n_half": half,
    }


def _save(path: Path, ref: ReferenceFeatures) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {"pooled": ref.pooled.contiguous(), "spatial": ref.spatial.contiguous()},
            tmp,
            metadata={"key": json.dumps(ref.key, sort_keys=True), "floor": json.dumps(ref.floor)},
        )
        os.replace(tmp, path)  # atomic: a concurrent eval never reads half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path, key: dict[str, Any]) -> ReferenceFeatures | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("key", "null")) != key:
                return None  # a hash collision or an older layout: recompute
            return ReferenceFeatures(
                f.get_tensor("pooled"), f.get_tensor("spatial"), json.loads(meta["floor"]), key, cached=True
            )
    except Exception:  # unreadable or truncated cache entry: recompute and overwrite it
        return None


def reference_features(
    ref: str | Path,
    image_size: int,
    channels: int,
    extractor: FeatureExtractor,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    batch: int = 256,
    progress: bool = False,
) -> ReferenceFeatures:
    """Features of the real images at `ref` (read with training.data.load_images at the model's size
    and channels) and the real-vs-real floor, from the cache when it holds them."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise DataError(f"{path}: reference data not found (no such file or folder)")
    path = path.resolve()
    key = {
        "version": CACHE_VERSION,
        "ref": str(path),
        "fingerprint": _fingerprint(path),
        "image_size": image_size,
        "channels": channels,
        "extractor": extractor.id,
        "floor_seed": FLOOR_SEED,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache_file = Path(cache_dir or default_cache_dir()) / f"ref-{digest}.safetensors"
    if use_cache and cache_file.is_file():
        hit = _load(cache_file, key)
        if hit is not None:
            return hit
    images = load_images(path, image_size, channels)
    if images.shape[0] < MIN_REFERENCE:
        raise DataError(f"{path}: {images.shape[0]} reference images; need at least {MIN_REFERENCE}")
    pooled, spatial = extract(extractor, images, batch=batch, progress=progress, desc="reference features")
    out = ReferenceFeatures(pooled, spatial, floor_metrics(pooled, spatial), key)
    if use_cache:
        _save(cache_file, out)
    return out
