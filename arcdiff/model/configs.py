"""Named network configurations: the paper's datasets at their published sizes, and a small
MNIST network that trains on a 2-core CPU."""

from __future__ import annotations

from arcdiff.model.unet import UNetConfig

CONFIGS: dict[str, UNetConfig] = {
    # DDPM's CIFAR-10 network (35.7M parameters with one head; the second head adds one conv's worth).
    "cifar10": UNetConfig(
        image_size=32, channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
    ),
    # DDIM's CelebA 64x64 network.
    "celeba64": UNetConfig(
        image_size=64,
        channels=3,
        ch=128,
        ch_mult=(1, 2, 2, 2, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
    ),
    # DDPM's LSUN 256x256 network.
    "church256": UNetConfig(
        image_size=256,
        channels=3,
        ch=128,
        ch_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.0,
    ),
    # 28x28 grayscale, 28 -> 14 -> 7 with 16/32/64 channels, attention at 7 (and in the middle
    # block): about 0.7M parameters, small enough to train on a CPU (cost per step:
    # docs/performance.md#figures-behind-the-defaults).
    "mnist": UNetConfig(
        image_size=28,
        channels=1,
        ch=16,
        ch_mult=(1, 2, 4),
        num_res_blocks=1,
        attn_resolutions=(7,),
        dropout=0.0,
        groups=8,
    ),
    # A few-thousand-parameter network for tests.
    "tiny": UNetConfig(
        image_size=8, channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, groups=4
    ),
}


def get_config(name: str, heads: int = 2, overrides: dict | None = None) -> UNetConfig:
    """The named config with `heads` and any field overrides (e.g. {"ch": 24, "time_cond": "logsnr"})."""
    try:
        cfg = CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown network config {name!r}; known: {', '.join(sorted(CONFIGS))}") from None
    return UNetConfig.from_dict({**cfg.to_dict(), **(overrides or {}), "heads": heads})


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE strings (the CLI's --arch) as UNetConfig fields; values parsed as JSON where they
    parse (numbers, lists), else kept as strings. Unknown fields are refused by UNetConfig."""
    import json

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--arch {item!r}: expected KEY=VALUE, e.g. ch=24 or ch_mult=[1,2,4]")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
