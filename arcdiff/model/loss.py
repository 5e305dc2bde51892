"""Training objectives: the paper's equation (12) and the two single-head baselines.

Each loss is a small callable holding its hyperparameters; it draws eta and eps itself from the
generator it is given (never the global RNG) and returns the per-sample loss (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from arcdiff.model.denoiser import split_prediction
from arcdiff.model.schedule import ETA_MAX, q_sample, velocity

Objective = Literal["dual", "eps", "x0"]
# How training draws eta: uniform on [0, pi/2] (the paper), or logit-normal (eta = pi/2 *
# sigmoid(N(0, 1)), as SD3 draws t), which spends more steps on the middle of the quarter circle,
# where the image's content is decided, and fewer near the ends, where x or eps alone nearly gives
# the answer.
ETA_DENSITIES = ("uniform", "logit_normal")
OBJECTIVE_PREDICTION = {"dual": "x0_eps", "eps": "eps", "x0": "x0"}


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (mean over all but the batch dimension)."""
    return (a - b).pow(2).flatten(1).mean(1)


def dual_loss(x0_hat, eps_hat, x0, eps, eta, gamma: float) -> torch.Tensor:
    """Equation (12): ||x0_hat - x0||^2 + ||eps_hat - eps||^2 + gamma ||v_hat - v||^2, per sample,
    with v = -sin(eta) x0 + cos(eta) eps and v_hat the velocity the two heads imply."""
    v, v_hat = velocity(x0, eps, eta), velocity(x0_hat, eps_hat, eta)
    return _mse(x0_hat, x0) + _mse(eps_hat, eps) + gamma * _mse(v_hat, v)


@dataclass(frozen=True)
class DiffusionLoss:
    """Draws eta (per `eta_density`) and eps ~ N(0, I), noises x0, and scores the network's output.

    objective: "dual" (equation 12, two heads), "eps" (noise only, DDPM's loss) or "x0" (image only).
    """

    objective: Objective = "dual"
    gamma: float = 1.0
    eta_density: str = "uniform"

    def __post_init__(self) -> None:
        if self.eta_density not in ETA_DENSITIES:
            raise ValueError(f"unknown eta density {self.eta_density!r}; expected one of {ETA_DENSITIES}")

    def draw_eta(self, b: int, generator: torch.Generator) -> torch.Tensor:
        if self.eta_density == "logit_normal":
            u = torch.sigmoid(torch.randn(b, generator=generator, device=generator.device, dtype=torch.float32))
        else:
            u = torch.rand(b, generator=generator, device=generator.device, dtype=torch.float32)
        return u * ETA_MAX

    @property
    def prediction(self) -> str:
        return OBJECTIVE_PREDICTION[self.objective]

    def __call__(self, net: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b = x0.shape[0]
        eta = self.draw_eta(b, generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x0.device)
        x = q_sample(x0, eps, eta)
        raw = net(x, eta).float()
        if self.objective == "dual":
            x0_hat, eps_hat = split_prediction(raw, x, eta, "x0_eps")
            return dual_loss(x0_hat, eps_hat, x0, eps, eta, self.gamma)
        if self.objective == "eps":
            return _mse(raw, eps)
        if self.objective == "x0":
            return _mse(raw, x0)
        raise ValueError(f"unknown objective {self.objective!r}; expected dual, eps or x0")
