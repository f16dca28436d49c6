import random

import pytest
from conftest import draw_shape

import transferkit


@pytest.fixture
def imbalanced(tmp_path):
    """10:1 circles to squares in train; balanced val and test."""
    rng = random.Random(0)
    counts = {
        "train": {"circle": 100, "square": 10},
        "val": {"circle": 10, "square": 10},
        "test": {"circle": 30, "square": 30},
    }
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            out = tmp_path / "imb" / split / cls
            out.mkdir(parents=True)
            for i in range(n):
                draw_shape(cls, 40, rng).save(out / f"{i}.png")
    return tmp_path / "imb"


def _minority_recall(data, tmp_path, seed: int = 0, **kw) -> float:
    run = transferkit.train(
        data=str(data),
        strategy="linear-probe",
        img_size=32,
        epochs=2,
        workers=0,
        quiet=True,
        runs_dir=str(tmp_path / "runs"),
        html_report=False,
        seed=seed,
        **kw,
    )
    return run.metrics["test"]["per_class"]["square"]["recall"]


# Minority recall of one run swings with the seed (0.03 to 1.0 on this data), so each remedy is compared
# with the plain run seed by seed over SEEDS. Measured on an AVX2 EPYC, seeds 0-4, mean square recall:
# plain 0.28 (bf16 0.33), balanced sampler 0.60 (0.62), class weights 0.71 (0.71); no seed lower than plain.
# The bar is half the smallest measured gain; a seed may lose at most 3 test images (0.1) to rounding.
SEEDS = range(5)
MIN_MEAN_GAIN = 0.15


def _gains(data, tmp_path, **remedy) -> list[float]:
    return [_minority_recall(data, tmp_path, seed, **remedy) - _minority_recall(data, tmp_path, seed) for seed in SEEDS]


def test_class_weights_auto_raise_minority_recall(imbalanced, tmp_path, capsys):
    _minority_recall(imbalanced, tmp_path)
    assert "classes are imbalanced (largest 100, smallest 10" in capsys.readouterr().err
    _minority_recall(imbalanced, tmp_path, class_weights="auto")
    assert "imbalanced" not in capsys.readouterr().err
    gains = _gains(imbalanced, tmp_path, class_weights="auto")
    assert sum(gains) / len(gains) >= MIN_MEAN_GAIN, gains
    assert min(gains) >= -0.1, gains


def test_balanced_sampler_raises_minority_recall(imbalanced, tmp_path):
    gains = _gains(imbalanced, tmp_path, sampler="balanced")
    assert sum(gains) / len(gains) >= MIN_MEAN_GAIN, gains
    assert min(gains) >= -0.1, gains
