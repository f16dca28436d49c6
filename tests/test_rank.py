"""rank: LogME per backbone on the training split, best first, written to rank.json; the features go to
the cache a linear probe's training reads, so neither a second rank nor that training extracts them again."""

import json

import pytest

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.core.machine import cache_root
from transferkit.training.recipe import train
from transferkit.tuning.rank import FEW_PER_CLASS, rank, recommend

MODELS = ["efficientnet_lite0", "efficientnet_lite1"]
FEW = {"shots": 5, "img_size": 64, "batch_size": 16, "workers": 0, "quiet": True}
"""builtin:faces at 5 shots: 10 training images, 64 px."""


class Lines:
    """A Reporter that keeps its info lines and draws no progress bars."""

    def __init__(self):
        self.lines = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def start_epoch(self, description: str, n_batches: int) -> None:
        pass

    def advance(self, batches: int) -> None:
        pass


def feature_files() -> set[str]:
    return {p.name for p in (cache_root() / "features").glob("*.npy")}


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """One rank of MODELS on builtin:faces: (result, its info lines, the folder it wrote rank.json to)."""
    out, lines = tmp_path_factory.mktemp("rank"), Lines()
    return rank("builtin:faces", MODELS, img_sizes=[64], config=TrainConfig(**FEW), report=lines, out=out), lines, out


def test_rank_scores_sorts_and_writes_rank_json(ranked):
    result, lines, out = ranked
    rows = result["rows"]
    assert [r["rank"] for r in rows] == [1, 2]
    assert {r["model"] for r in rows} == set(MODELS)
    assert rows[0]["logme"] >= rows[1]["logme"]
    assert all(
        r["img_size"] == 64 and r["n_train"] == 10 and r["feature_dim"] == 1280 and r["seconds"] > 0 for r in rows
    )
    assert set(rows[0]) == {"model", "img_size", "logme", "seconds", "n_train", "feature_dim", "rank"}
    assert rows[1]["logme"] > result["chance_logme"]  # pretrained features beat the class shares alone
    assert result["recommendation"]["strategy"] == "linear-probe"  # 5 images per class
    assert json.loads((out / "rank.json").read_text()) == result
    assert sum(line.startswith("[rank] ") for line in lines.lines) == 2


def test_a_second_rank_extracts_nothing_again(ranked):
    cached = feature_files()
    again = rank("builtin:faces", MODELS[::-1], img_sizes=[64], config=TrainConfig(**FEW))
    assert feature_files() == cached
    assert [(r["model"], r["logme"]) for r in again["rows"]] == [(r["model"], r["logme"]) for r in ranked[0]["rows"]]


def test_a_linear_probe_run_reads_the_training_features_rank_cached(ranked, tmp_path):
    before = feature_files()
    train(
        TrainConfig(
            **FEW,
            data="builtin:faces",
            model=MODELS[0],
            strategy="linear-probe",
            epochs=1,
            html_report=False,
            runs_dir=str(tmp_path / "runs"),
        )
    )
    assert len(feature_files() - before) == 1  # the validation split's features only


def test_unknown_model_is_named_before_any_work(tmp_path):
    with pytest.raises(UserError, match="efficientnet_lite9"):
        rank("builtin:faces", ["efficientnet_lite0", "efficientnet_lite9"], config=TrainConfig(**FEW), out=tmp_path)
    assert not (tmp_path / "rank.json").exists()
    with pytest.raises(UserError, match="at least one model"):
        rank("builtin:faces", [])


def test_recommendation_follows_images_per_class():
    top = {"model": "efficientnet_lite0", "img_size": 64, "logme": 0.5}
    few, many = recommend(5 * (FEW_PER_CLASS - 1), 5, top, chance=-0.7), recommend(5 * FEW_PER_CLASS, 5, top, -0.7)
    assert (few["strategy"], many["strategy"]) == ("linear-probe", "finetune")
    assert few["gain_over_chance"] == pytest.approx(1.2)
    assert "already carry" in few["why"]
    assert "barely" in recommend(500, 5, top, chance=0.45)["why"]
    assert all(r["why"].count(". ") == 0 and r["why"].endswith(".") for r in (few, many))  # one sentence
