"""The UNet's configuration (config.json's "architecture"), without torch: the model catalogue
validates a folder's architecture with it, and arcdiff.model.unet builds the network from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

TIME_CONDS = ("eta", "logsnr")


@dataclass(frozen=True)
class UNetConfig:
    image_size: int
    channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    heads: int = 2
    groups: int = 32
    # What the network is told about the noise level:
    # - "eta": DDPM's sinusoidal embedding of t = eta * 2/pi * time_scale (t = 1000 at pi/2). Its top
    #   frequency (one radian per unit of t) makes the output ripple in eta with a period of
    #   pi^2 / (2 time_scale) (0.0099 for 1000): steps of a similar size alias the ripple.
    # - "logsnr": the embedding of lambda / 4 = log(cot eta) / 4 (EDM conditions on log sigma the
    #   same way) with a top frequency of one radian per unit: smooth at the scale of any step a
    #   sampler takes, and fine where the noise level changes fastest in log terms, near both ends.
    time_cond: str = "eta"
    time_scale: float = 1000.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    def __post_init__(self) -> None:
        if self.time_cond not in TIME_CONDS:
            raise ValueError(f"unknown time_cond {self.time_cond!r}; expected one of {TIME_CONDS}")
        for width in {self.ch, *(self.ch * m for m in self.ch_mult)}:
            if width % min(self.groups, width):
                raise ValueError(f"{width} channels do not split into {self.groups} groups: choose ch, ch_mult to fit")

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known - {"type"}
        if unknown:
            raise ValueError(f"unknown UNet config field(s): {sorted(unknown)}")
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("ch_mult", "attn_resolutions"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)
