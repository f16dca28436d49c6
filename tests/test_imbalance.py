import random

import pytest

import transferkit
from conftest import draw_shape


@pytest.fixture
def imbalanced(tmp_path):
    """10:1 circles to squares in train; balanced val and test."""
    rng = random.Random(0)
    counts = {"train": {"circle": 100, "square": 10}, "val": {"circle": 10, "square": 10},
              "test": {"circle": 30, "square": 30}}
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            out = tmp_path / "imb" / split / cls
            out.mkdir(parents=True)
            for i in range(n):
                draw_shape(cls, 40, rng).save(out / f"{i}.png")
    return tmp_path / "imb"


def _minority_recall(data, tmp_path, **kw) -> float:
    run = transferkit.train(data=str(data), strategy="linear-probe", img_size=32, epochs=2, workers=0, quiet=True,
                            runs_dir=str(tmp_path / "runs"), **kw)
    return run.metrics["test"]["per_class"]["square"]["recall"]


def test_class_weights_auto_raise_minority_recall(imbalanced, tmp_path, capsys):
    plain = _minority_recall(imbalanced, tmp_path)
    assert "classes are imbalanced (largest 100, smallest 10" in capsys.readouterr().err
    weighted = _minority_recall(imbalanced, tmp_path, class_weights="auto")
    assert "imbalanced" not in capsys.readouterr().err
    assert weighted >= plain + 0.2, (plain, weighted)


def test_balanced_sampler_raises_minority_recall(imbalanced, tmp_path):
    plain = _minority_recall(imbalanced, tmp_path)
    balanced = _minority_recall(imbalanced, tmp_path, sampler="balanced")
    assert balanced >= plain + 0.2, (plain, balanced)
