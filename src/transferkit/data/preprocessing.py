"""What a model expects of an image: size, mean/std, interpolation, crop, channels. Read from the
backbone's pretrained config (see `models.classifier`), saved in every run and bundle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Preprocessing:
    """What an image goes through before the network; from the backbone's pretrained config."""

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    in_chans: int

    @property
    def resize(self) -> int:
        """Short side before the eval center crop: img_size / crop_pct."""
        return int(round(self.img_size / self.crop_pct))

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std): what `Runtime.batch` normalises uint8 batches with."""
        return tuple(self.mean), tuple(self.std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})
