"""The paper's four sample-quality metrics, as plain functions over feature tensors.

- FID (Heusel et al. 2017): Frechet distance between Gaussian fits of pooled features.
- sFID (Nash et al. 2021): the same distance on spatial features (an intermediate conv map).
- Precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
  around its points with radius the distance to the point's k-th nearest neighbour (k = 3);
  precision is the fraction of generated points inside the real manifold, recall the fraction of
  real points inside the generated one.

Statistics are in float64; pairwise distances run in row blocks with torch so that
10k x 10k never materialises at once.
"""

from __future__ import annotations

import numpy as np
import torch

PR_NEIGHBOURS = 3  # k of Kynkaanniemi et al.: the value the paper (and ADM's evaluator) uses


class GaussianStats:
    """Mean and covariance of a feature set (float64), with its covariance's square root computed
    once on first use: a reference set's stats are reused by every eval against it."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        self.mu, self.sigma = mu, sigma
        self._sqrt: torch.Tensor | None = None

    @property
    def sigma_sqrt(self) -> torch.Tensor:
        if self._sqrt is None:
            self._sqrt = _sqrtm_psd(self.sigma)
        return self._sqrt


def _f64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).detach().cpu().to(torch.float64)


def gaussian_stats(features: torch.Tensor | np.ndarray) -> GaussianStats:
    """Mean and (unbiased) covariance of features (N, D), N >= 2."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return GaussianStats(mu, c.T @ c / (f.shape[0] - 1))


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues from
    round-off (a singular covariance) are clipped to 0 rather than turned into NaNs."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _frechet(
    mu1: torch.Tensor, sigma1: torch.Tensor, s1h: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    m = s1h @ sigma2 @ s1h
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    d = float(diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * tr_covmean)
    return max(d, 0.0)  # round-off can leave -1e-12 for identical inputs


def frechet_distance(
    mu1: torch.Tensor | np.ndarray,
    sigma1: torch.Tensor | np.ndarray,
    mu2: torch.Tensor | np.ndarray,
    sigma2: torch.Tensor | np.ndarray,
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr (S1 S2)^(1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2. Unlike scipy.linalg.sqrtm
    on the non-symmetric product this needs no complex arithmetic, no "imaginary component"
    fudge, and no eps added to the diagonals when a covariance is singular (fewer samples than
    dimensions, or dead ReLU features). float64 throughout; torch's LAPACK keeps to the thread
    count set with torch.set_num_threads (numpy's OpenBLAS pool does not, and oversubscribes a
    busy CPU)."""
    mu1, mu2, sigma1, sigma2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"mismatched statistics: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}"
        )
    return _frechet(mu1, sigma1, _sqrtm_psd(sigma1), mu2, sigma2)


def frechet_distance_stats(a: GaussianStats, b: GaussianStats) -> float:
    """The Frechet distance, reusing `a`'s cached covariance square root (pass the reference as `a`)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"mismatched feature dimensions: {tuple(a.mu.shape)} vs {tuple(b.mu.shape)}")
    return _frechet(a.mu, a.sigma, a.sigma_sqrt, b.mu, b.sigma)


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets (N, D) and (M, D)."""
    return frechet_distance_stats(gaussian_stats(a), gaussian_stats(b))


def _as_float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.float() if t.dtype not in (torch.float32, torch.float64) else t


def knn_radii(features: torch.Tensor | np.ndarray, k: int = PR_NEIGHBOURS, block: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    f = _as_float(features)
    n = f.shape[0]
    if n <= k:
        raise ValueError(f"need more than k = {k} points for k-NN radii, got {n}")
    out = torch.empty(n, dtype=f.dtype)
    for s in range(0, n, block):
        d = torch.cdist(f[s : s + block], f)
        # the point itself is at distance 0 and is the smallest: the k-th neighbour is the (k+1)-th value
        out[s : s + block] = d.kthvalue(k + 1, dim=1).values
    return out


def manifold_coverage(
    points: torch.Tensor | np.ndarray, support: torch.Tensor | np.ndarray, radii: torch.Tensor, block: int = 1024
) -> float:
    """Fraction of `points` that lie within radii[i] of some support[i] (the k-NN manifold)."""
    p, s = _as_float(points), _as_float(support)
    p, s = p.to(torch.promote_types(p.dtype, s.dtype)), s.to(torch.promote_types(p.dtype, s.dtype))
    r = radii.to(p.dtype)
    inside = 0
    for i in range(0, p.shape[0], block):
        d = torch.cdist(p[i : i + block], s)
        inside += int((d <= r[None, :]).any(dim=1).sum())
    return inside / p.shape[0]


def precision_recall(
    real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = PR_NEIGHBOURS, block: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of `fake` against `real`."""
    real_r, fake_r = knn_radii(real, k, block), knn_radii(fake, k, block)
    return manifold_coverage(fake, real, real_r, block), manifold_coverage(real, fake, fake_r, block)
