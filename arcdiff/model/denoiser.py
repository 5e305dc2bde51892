"""One interface for every solver: a denoiser (x, eta) -> (x0_hat, eps_hat), eta a per-sample vector.

A dual-head network gives both estimates. A network with one head (eps, x0 or v prediction) is
wrapped so that the other is derived from x = cos(eta) x0 + sin(eta) eps. Two of those
derivations divide by a quantity that vanishes at an end of the eta axis:

- eps prediction: x0_hat = (x - sin(eta) eps_hat) / cos(eta), and cos(eta) -> 0 at pure noise.
  We divide by max(cos(eta), DIVISOR_FLOOR) and then clip x0_hat to the data range (the
  "clip_denoised" of DDPM/DDIM). At eta = pi/2 the division only amplifies the network's error,
  and the clip bounds it; the solvers weight x0_hat by cos(eta_next) there, which is small.
- x0 prediction: eps_hat = (x - cos(eta) x0_hat) / sin(eta), and sin(eta) -> 0 at the data end.
  We divide by max(sin(eta), DIVISOR_FLOOR); only an evaluation at exactly eta = 0 (the last
  stage of heun and rk4) reaches the floor, and ddim/dpmpp2m never evaluate there.

v prediction needs no division: x0 = cos x - sin v, eps = sin x + cos v.

Scalings run in float32 (or the input's dtype if wider); only the inner network call may run in
reduced precision (autocast), and its output is cast back before any arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Literal

import torch
from torch import nn

from arcdiff.model.catalog import PREDICTIONS, heads_for
from arcdiff.model.schedule import expand_like

Prediction = Literal["x0_eps", "eps", "x0", "v"]
DIVISOR_FLOOR = 1e-3

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def split_prediction(
    raw: torch.Tensor, x: torch.Tensor, eta: torch.Tensor, prediction: str, clip: float | None = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network's raw output into (x0_hat, eps_hat), deriving what a single head lacks."""
    c, s = expand_like(torch.cos(eta), x), expand_like(torch.sin(eta), x)
    if prediction == "x0_eps":
        x0_hat, eps_hat = raw.chunk(2, dim=1)
        return x0_hat, eps_hat
    if prediction == "eps":
        eps_hat = raw
        x0_hat = (x - s * eps_hat) / c.clamp_min(DIVISOR_FLOOR)
        if clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        return x0_hat, eps_hat
    if prediction == "x0":
        x0_hat = raw
        return x0_hat, (x - c * x0_hat) / s.clamp_min(DIVISOR_FLOOR)
    if prediction == "v":
        return c * x - s * raw, s * x + c * raw
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


class Denoiser(nn.Module):
    """Wraps a network net(x, eta) -> raw output as a denoiser (x, eta) -> (x0_hat, eps_hat).

    `amp_dtype` (bfloat16 or float16) runs the network under autocast on the input's device; the
    split into x0_hat and eps_hat always happens in float32. The worker sets it by default only on
    CUDA (on a CPU it is slower, and only used when asked).
    """

    def __init__(self, net: nn.Module, prediction: str, clip: float | None = 1.0, amp_dtype: torch.dtype | None = None):
        super().__init__()
        heads_for(prediction)  # validates
        self.net = net
        self.prediction = prediction
        self.clip = clip
        self.amp_dtype = amp_dtype

    def forward(self, x: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        work = torch.promote_types(x.dtype, torch.float32)
        amp = (
            torch.autocast(device_type=x.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else nullcontext()
        )
        with amp:
            raw = self.net(x, eta)
        raw = raw.to(work)
        return split_prediction(raw, x.to(work), eta.to(work), self.prediction, self.clip)
