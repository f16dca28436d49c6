"""`transferkit tune` on one machine: a study in SQLite, continued, its best config retrained; bad input."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.tuning.space import parse_search

TINY = ["--img-size", "32", "--epochs", "2", "--precision", "fp32", "--quiet"]


def tune(runs, *args):
    return CliRunner().invoke(app, ["tune", "builtin:faces", *TINY, "--runs-dir", str(runs), "--name", "s", *args])


def states(folder):
    return [t["state"] for t in json.loads((folder / "study.json").read_text())["trials"]]


def test_a_study_finishes_continues_and_its_best_config_trains_to_the_same_score(tmp_path):
    out = tune(tmp_path, "--trials", "4")
    assert out.exit_code == 0, out.output
    folder = tmp_path / "s"
    assert sum(s in ("complete", "pruned") for s in states(folder)) == 4
    trials = sorted((folder / "trials").iterdir())
    for run in trials:  # trials never score the test split; they are ordinary runs otherwise
        assert json.loads((run / "metrics.json").read_text())["test"] is None
        assert (run / "best" / "model.json").is_file()
        assert (
            json.loads((run / "split.json").read_text())["splits"]
            == json.loads((folder / "split.json").read_text())["splits"]
        )

    out = tune(tmp_path, "--trials", "6")  # the same command, a higher total: the study goes on
    assert out.exit_code == 0, out.output
    summary = json.loads((folder / "study.json").read_text())
    assert sum(s in ("complete", "pruned") for s in states(folder)) == 6
    assert [t["number"] for t in summary["trials"]] == list(range(len(summary["trials"])))
    params = [json.dumps(t["params"], sort_keys=True) for t in summary["trials"]]
    assert len(set(params)) == len(params)  # the continued study did not replay its first trials
    assert summary["feature_cache"]["hits"] > 0  # probe phases shared the features extracted once

    best = json.loads((folder / "best.json").read_text())
    assert best["test"]["n"] == 80
    assert 0.0 <= best["test"]["accuracy"] <= 1.0  # scored once, at the end
    assert json.loads(out.stdout.strip().splitlines()[-1])["best_trial"] == best["trial"]
    config = TrainConfig.load(folder / "best.yaml")
    assert config.runs_dir == str(tmp_path)
    assert config.split_file == str(folder / "split.json")
    run = transferkit.train(config.replace(name="again", quiet=True, html_report=False))
    assert run.metrics["best"]["val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-12)
    page = (folder / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert page.count("<tr>") == len(summary["trials"]) + 1


def test_fixed_options_leave_the_space_and_refused_combinations_fail_alone(tmp_path):
    (tmp_path / "study.yaml").write_text(
        "search:\n  strategy: [lp-ft, linear-probe]\n  epochs: [1, 2]\n  lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n"
    )
    out = tune(tmp_path, "--trials", "3", "--lr", "0.003", "--config", str(tmp_path / "study.yaml"), "--pruner", "none")
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "s" / "study.json").read_text())
    assert all("lr" not in t["params"] for t in summary["trials"])  # --lr fixed it
    for t in summary["trials"]:
        if t["params"] == {"strategy": "lp-ft", "epochs": 1}:  # lp-ft needs 2 epochs: failed, with the reason
            assert t["state"] == "fail"
            assert "lp-ft needs a probe and a fine-tune phase" in t["error"]
        else:
            assert t["state"] == "complete"
    assert summary["finished"] == 3


@pytest.mark.parametrize(
    "search,message",
    [
        ({"learning_rate": [0.1]}, "Unknown search field 'learning_rate'"),
        ({"lr": {"low": 0.1}}, "give a list of choices, or a mapping with low and high"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "needs low < high"),
        ({"lr": {"low": 0, "high": 0.01, "log": True}}, "low > 0 on a log scale"),
        ({"lr": {"low": 1e-3, "high": 1e-2, "scale": "log"}}, "give a list of choices"),
        ({"data": ["builtin:digits"]}, "every trial must share it"),
        ({"strategy": []}, "the list of choices is empty"),
    ],
)
def test_a_bad_search_section_names_the_field(search, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_search(search, "'study.yaml'")


def test_bad_input_is_refused_before_any_trial_runs(tmp_path):
    def cli(*args):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "transferkit",
                "tune",
                "builtin:faces",
                *TINY,
                "--runs-dir",
                str(tmp_path),
                "--name",
                "s",
                *args,
            ],
            capture_output=True,
            text=True,
        )

    (tmp_path / "bad.yaml").write_text("search:\n  strategy: [finetune, lpft]\n")
    out = cli("--trials", "2", "--config", str(tmp_path / "bad.yaml"))
    assert out.returncode == 2
    assert "'lpft' is refused" in out.stderr
    assert "Did you mean 'lp-ft'" in out.stderr
    assert not (tmp_path / "s" / "trials").exists()
    assert "Traceback" not in out.stderr
    out = cli("--trials", "0")
    assert out.returncode == 2
    assert "--trials must be at least 1; got 0" in out.stderr
    out = cli("--trials", "2", "--pruner", "asha")
    assert out.returncode == 2
    assert "--pruner must be one of median, hyperband, none" in out.stderr


def test_models_are_ranked_first_and_the_top_k_searched(tmp_path):
    out = tune(
        tmp_path,
        "--trials",
        "2",
        "--strategy",
        "linear-probe",
        "--models",
        "efficientnet_lite0,efficientnet_lite1",
        "--top-k",
        "1",
    )
    assert out.exit_code == 0, out.output
    ranked = json.loads((tmp_path / "s" / "rank.json").read_text())
    top = ranked["rows"][0]["model"]
    summary = json.loads((tmp_path / "s" / "study.json").read_text())
    assert {t["params"]["model"] for t in summary["trials"]} == {top}
    for t in summary["trials"]:  # the ranking's features were the probes' features
        assert t["feature_cache"][0] >= 1
    assert "strategy" not in summary["trials"][0]["params"]
    out = tune(tmp_path, "--trials", "2", "--model", "efficientnet_lite0", "--models", "auto")
    assert isinstance(out.exception, UserError)
    assert "give one of them" in str(out.exception)


def test_seeds_per_trial_average_their_runs(tmp_path):
    out = tune(tmp_path, "--trials", "1", "--strategy", "linear-probe", "--seeds-per-trial", "2")
    assert out.exit_code == 0, out.output
    trial = json.loads((tmp_path / "s" / "study.json").read_text())["trials"][0]
    assert [p.rsplit("/", 1)[-1] for p in trial["runs"]] == ["0000-seed0", "0000-seed1"]
    scores = [
        json.loads((tmp_path / "s" / "trials" / name / "metrics.json").read_text())["best"]["val_accuracy"]
        for name in ("0000-seed0", "0000-seed1")
    ]
    assert trial["value"] == pytest.approx(sum(scores) / 2, abs=1e-12)
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    assert len(best["test"]["runs"]) == 2  # the best config's test score covers both seeds' models


def test_a_storage_that_cannot_be_opened_is_one_clear_error(tmp_path):
    out = tune(tmp_path, "--trials", "1", "--storage", "postgresql+psycopg2://u:secret@127.0.0.1:1/none")
    assert isinstance(out.exception, UserError), out.output
    assert "Cannot open the study's storage" in str(out.exception)
    assert "secret" not in str(out.exception)


def test_a_worker_that_finds_the_tables_being_created_looks_again(tmp_path, monkeypatch):
    """Workers starting together on a new SQLite study race to create its tables: the loser's
    'table ... already exists' (an OperationalError on SQLite) is a reason to look again, not an error."""
    import optuna
    import sqlalchemy

    calls = []

    class Racing(optuna.storages.RDBStorage):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                message = "table alembic_version already exists"
                raise sqlalchemy.exc.OperationalError("CREATE TABLE alembic_version", {}, message)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    out = tune(tmp_path, "--trials", "1", "--strategy", "linear-probe")
    assert out.exit_code == 0, out.output
    assert len(calls) > 1  # the first raised; tune opened the storage again and went on
    assert json.loads((tmp_path / "s" / "study.json").read_text())["trials"][0]["state"] == "complete"
