"""Run folders a new user meets (issue 37, items 4-6): a start that fails leaves nothing behind, a run's own
config.yaml starts a new run, and resuming a finished run says so instead of testing it again."""

import json

import pytest
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.core.errors import UserError

runner = CliRunner()


def test_a_start_that_fails_leaves_no_folder_and_frees_its_name(shapes_dir, tiny, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(UserError, match="not found"):
        transferkit.train(data=str(shapes_dir), name="half", target=str(tmp_path / "missing"), **tiny)
    assert not (runs / "half").exists()
    run = transferkit.train(data=str(shapes_dir), name="half", strategy="linear-probe", **tiny)  # the name is free
    assert (run.dir / "last.ckpt").is_file()


def test_a_runs_own_config_starts_a_new_run_with_a_name_of_its_own(shapes_dir, tiny, tmp_path):
    first = transferkit.train(data=str(shapes_dir), name="first", strategy="linear-probe", **tiny)
    result = runner.invoke(app, ["train", "--config", str(first.dir / "config.yaml"), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout.strip().splitlines()[-1])["run"]
    assert second != str(first.dir)
    assert (tmp_path / "runs" / second.rsplit("/", 1)[-1] / "best").is_dir()
    named = runner.invoke(app, ["train", "--config", str(first.dir / "config.yaml"), "--name", "first", "--quiet"])
    assert isinstance(named.exception, UserError)  # a name given on purpose is still refused when taken
    assert "already exists" in str(named.exception)


def test_resuming_a_finished_run_says_it_is_complete_and_how_to_train_longer(shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), name="done", strategy="linear-probe", **tiny)
    report = (run.dir / "metrics.json").read_text()
    with pytest.raises(UserError, match=r"is complete.*--resume .*done --epochs 6"):
        transferkit.train(resume=run.dir)
    assert (run.dir / "metrics.json").read_text() == report  # not tested again
    longer = transferkit.train(resume=run.dir, epochs=2)
    assert longer.metrics["epochs_run"] == 2


def test_train_names_the_options_its_strategy_ignores(shapes_dir, tiny, capsys):
    transferkit.train(data=str(shapes_dir), name="lp", strategy="linear-probe", layer_decay=0.75, **tiny)
    said = capsys.readouterr().err
    assert "warning: --layer-decay 0.75 is ignored: strategy linear-probe" in said
    transferkit.train(resume=tiny["runs_dir"] + "/lp", epochs=2)
    assert "is ignored" not in capsys.readouterr().err  # said once, when the run started
