"""The DDPM/DDIM UNet (Ho et al. 2020) conditioned on a continuous angle eta, with one or two heads.

The architecture follows the DDPM CIFAR-10 network: residual blocks with group norm and a
time-embedding projection, self-attention at the resolutions the config names, a middle block
(res, attn, res), and skip connections from every down block to the up path. The output conv
produces `heads * channels` maps; with two heads the first `channels` are x0_hat and the rest
eps_hat.

forward() has no Python branch on tensor values (only on shapes and config), so torch.compile
traces it in one graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arcdiff.model.schedule import ETA_MAX, log_snr_half
from arcdiff.model.unet_config import TIME_CONDS as TIME_CONDS  # re-exported: the config lives without torch
from arcdiff.model.unet_config import UNetConfig as UNetConfig

# lambda is infinite at both ends; the network sees it clipped to |lambda| <= 13.8 (eta within 1e-6
# of an end), beyond which no sampler step resolves a difference.
LOGSNR_ETA_MARGIN = 1e-6
# the slowest frequency of the log-SNR embedding is 1/LOGSNR_MAX_PERIOD radian per unit of lambda/4
LOGSNR_MAX_PERIOD = 100.0


def timestep_embedding(eta: torch.Tensor, dim: int, time_scale: float) -> torch.Tensor:
    """Sinusoidal embedding of a continuous angle (float32, (B,) -> (B, dim))."""
    t = eta.float() * (time_scale / ETA_MAX)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=eta.device, dtype=torch.float32) / (half - 1))
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def logsnr_embedding(eta: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of lambda / 4 = log(cot eta) / 4 (float32, (B,) -> (B, dim)), with
    frequencies from 1 down to 1 / LOGSNR_MAX_PERIOD radian per unit."""
    eta = eta.float().clamp(LOGSNR_ETA_MARGIN, ETA_MAX - LOGSNR_ETA_MARGIN)
    c = log_snr_half(eta) / 4
    half = dim // 2
    freqs = torch.exp(
        -math.log(LOGSNR_MAX_PERIOD) * torch.arange(half, device=eta.device, dtype=torch.float32) / max(1, half - 1)
    )
    args = c[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def noise_embedding(eta: torch.Tensor, cfg: UNetConfig) -> torch.Tensor:
    """The conditioning vector for the network's time MLP, per cfg.time_cond."""
    if cfg.time_cond == "logsnr":
        return logsnr_embedding(eta, cfg.ch)
    return timestep_embedding(eta, cfg.ch, cfg.time_scale)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions, as in DDPM."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, c), c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Upsample to the skip's size (not a fixed 2x) so odd sizes such as 7 -> 14 -> 28 work.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """f(x, eta) -> raw head outputs of shape (B, heads * channels, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.ch, cfg.groups
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(cfg.channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_ch = [ch]
        cur, res = ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * mult, temb_dim, cfg.dropout, g)])
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    block.append(AttnBlock(cur, g))
                self.down.append(block)
                skip_ch.append(cur)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_ch.append(cur)
                res = (res + 1) // 2

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, temb_dim, cfg.dropout, g),
                AttnBlock(cur, g),
                ResBlock(cur, cur, temb_dim, cfg.dropout, g),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skip_ch.pop(), ch * mult, temb_dim, cfg.dropout, g)])
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    block.append(AttnBlock(cur, g))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res = res * 2
        self.norm_out = nn.GroupNorm(min(g, cur), cur)
        self.conv_out = nn.Conv2d(cur, cfg.heads * cfg.channels, 3, padding=1)

    def forward(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        temb = self.temb(noise_embedding(eta, self.cfg).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            assert isinstance(block, nn.ModuleList)  # for the type checker: ModuleList's items are typed Module
            for layer in block:
                h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for block in self.up:
            assert isinstance(block, nn.ModuleList)
            if isinstance(block[0], Upsample):
                h = block[0](h, skips[-1].shape[-2:])
                continue
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
