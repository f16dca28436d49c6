"""What a model expects of an image: size, mean/std, interpolation, crop, channels. Read from the
backbone's pretrained config (see `models.classifier`), saved in every run and bundle. A text model's:
its tokenizer and a maximum length.
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
    kind = "image"  # (not a field: model.json files keep their keys)

    @property
    def resize(self) -> int:
        """Short side before the eval center crop: img_size / crop_pct."""
        return int(round(self.img_size / self.crop_pct))

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std): what `Runtime.batch` normalises uint8 batches with."""
        return tuple(self.mean), tuple(self.std)

    def example_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of a batch of `batch` inputs (what a precision probe times)."""
        return batch, self.in_chans, self.img_size, self.img_size

    def describe(self) -> str:
        return f"{self.img_size}px"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass
class TextPreprocessing:
    """What a text goes through: the encoder's own tokenizer (its tokenizer.json, carried whole so a bundle
    needs nothing else), cut at `max_length` tokens; batches are padded with `pad_id`."""

    max_length: int
    pad_id: int
    tokenizer: str
    """The tokenizers library's JSON of the encoder's tokenizer."""
    kind: str = "text"
    img_size = resize = mean_std = in_chans = None  # no pixels: the image-only steps (caches, resizing) see None

    def example_shape(self, batch: int) -> None:
        return None  # token ids: precision auto decides without timing (see models.precision.Workload)

    def describe(self) -> str:
        return f"at most {self.max_length} tokens"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextPreprocessing:
        return cls(**d)


def preprocessing_from_dict(d: dict) -> Preprocessing | TextPreprocessing:
    """The preprocessing a model.json or run records (text carries kind: text)."""
    return TextPreprocessing.from_dict(d) if d.get("kind") == "text" else Preprocessing.from_dict(d)
