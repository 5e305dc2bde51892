"""A Gaussian mixture whose posterior mean E[x0 | x_eta] is closed-form: the exact denoiser."""

from __future__ import annotations

import torch


class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, sd_k^2 I) in d dimensions (float64)."""

    def __init__(self, means, sds, weights):
        self.mu = torch.as_tensor(means, dtype=torch.float64)  # (K, d)
        self.sd = torch.as_tensor(sds, dtype=torch.float64)  # (K,)
        self.w = torch.as_tensor(weights, dtype=torch.float64)  # (K,)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.mu.shape[1], generator=generator, dtype=torch.float64)
        return self.mu[k] + self.sd[k, None] * z

    def mean(self) -> torch.Tensor:
        return (self.w[:, None] * self.mu).sum(0)

    def cov(self) -> torch.Tensor:
        d = self.mu.shape[1]
        m = self.mean()
        c = torch.zeros(d, d, dtype=torch.float64)
        for w, mu, sd in zip(self.w, self.mu, self.sd, strict=True):
            c += w * (sd**2 * torch.eye(d, dtype=torch.float64) + torch.outer(mu - m, mu - m))
        return c

    def denoiser(self, x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | x], E[eps | x]) for x = cos(eta) x0 + sin(eta) eps; x is (B, d) or (B, d, 1, 1)."""
        shape = x.shape
        x = x.reshape(shape[0], -1).to(torch.float64)
        c = torch.cos(eta.to(torch.float64))[:, None, None]  # (B, 1, 1)
        s = torch.sin(eta.to(torch.float64))[:, None, None]
        var = c**2 * self.sd[None, :, None] ** 2 + s**2  # (B, K, 1): per-component marginal variance
        diff = x[:, None, :] - c * self.mu[None]  # (B, K, d)
        d = x.shape[1]
        logp = torch.log(self.w)[None] - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * d * torch.log(var[..., 0])
        r = torch.softmax(logp, dim=1)[..., None]  # (B, K, 1) responsibilities
        x0_k = self.mu[None] + c * self.sd[None, :, None] ** 2 / var * diff
        eps_k = s / var * diff
        return (r * x0_k).sum(1).reshape(shape), (r * eps_k).sum(1).reshape(shape)


def default_mixture() -> GaussianMixture:
    return GaussianMixture(means=[[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], sds=[0.3, 0.4, 0.25], weights=[0.3, 0.5, 0.2])
