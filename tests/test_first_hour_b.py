"""Issue 37, a new user's first hour: the defects found, each fed the input that showed it (items 3, 7, 10,
11, 12 and 15)."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.cli.startup import quiet_third_party
from transferkit.core.checks import ignored_options
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.evaluation.calibration import T_BOUNDS, choose_temperature, fit_temperature
from transferkit.evaluation.report import _calibration, _calibration_section
from transferkit.training.lrfind import MAX_STEPS, MIN_STEPS, sweep_steps
from transferkit.tuning.space import parse_search

TINY = ["--img-size", "32", "--epochs", "2", "--precision", "fp32", "--quiet", "--pruner", "none"]

# --- 3: temperature scaling on a tiny or misleading validation split ------------------------------------


def test_a_temperature_from_7_validation_images_is_bounded_and_not_recommended():
    logits = np.zeros((7, 3))
    logits[:, 0] = 9.0  # sure of class 0, and every one wrong: unbounded, T ran to 442,535
    labels = np.ones(7, dtype=int)
    assert fit_temperature(logits, labels) == T_BOUNDS[1] == 20.0
    assert fit_temperature(logits, np.zeros(7, dtype=int)) == T_BOUNDS[0]  # every one right: towards 0
    choice = choose_temperature(logits, labels)
    assert choice["recommended"] is False
    assert "7 validation images are too few" in choice["why"]


def test_a_temperature_that_does_not_help_on_held_out_validation_images_is_not_recommended():
    # a calibrated model: 70 % sure of class 0 and right 70 % of the time, ECE 0; a temperature fitted
    # on part of the images only follows that part's share of right answers
    labels = np.random.default_rng(0).permutation([0] * 35 + [1] * 15)
    logits = np.zeros((50, 2))
    logits[:, 0] = np.log(0.7 / 0.3)
    choice = choose_temperature(logits, labels)
    assert choice["ece_heldout"] < 1e-9 < choice["ece_heldout_scaled"]
    assert choice["recommended"] is False and choice["why"].startswith("not recommended, it did not help")


def test_the_report_says_whether_the_temperature_is_applied_and_why():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    preds = np.where(rng.random(400) < 0.7, labels, (labels + rng.integers(1, 4, 400)) % 4)
    logits = rng.normal(0, 1, (400, 4))
    logits[np.arange(400), preds] += 8.0  # 70 % right but about 99 % sure: scaling helps anywhere
    cal = _calibration(logits[:200], labels[:200], logits[200:], labels[200:])
    assert cal["recommended"] is True and cal["ece_heldout_scaled"] < cal["ece_heldout"] / 2
    assert T_BOUNDS[0] < cal["temperature"] < T_BOUNDS[1]
    assert "(applied)" in _calibration_section(cal, logits[:200], labels[:200])
    tiny = _calibration(logits[:200], labels[:200], logits[200:207], labels[200:207])
    page = _calibration_section(tiny, logits[:200], labels[:200])
    assert "(not applied)" in page and "too few to judge a temperature" in page


# --- 7: the usual PostgreSQL URL, and a missing database driver -----------------------------------------


def test_tune_takes_the_plain_postgresql_url(postgres, tmp_path):
    import optuna

    plain = postgres.replace("postgresql+psycopg2://", "postgresql://")  # what everyone writes
    assert plain.startswith("postgresql://postgres@127.0.0.1:")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferkit",
            "tune",
            "builtin:faces",
            *TINY,
            "--strategy",
            "linear-probe",
            "--trials",
            "1",
            "--runs-dir",
            str(tmp_path),
            "--name",
            "plain",
            "--storage",
            plain,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    trials = optuna.load_study(study_name="plain", storage=plain).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]


@pytest.mark.parametrize(
    "url,module",
    [
        ("postgresql://u:secret@127.0.0.1:1/db", "psycopg"),
        ("postgresql+psycopg2://u:secret@127.0.0.1:1/db", "psycopg2"),
    ],
)
def test_a_missing_database_driver_says_which_extra_to_install(tmp_path, monkeypatch, url, module):
    monkeypatch.setitem(sys.modules, module, None)  # as where the driver is not installed: importing it fails
    with pytest.raises(UserError) as err:
        transferkit.tune(
            data="builtin:faces", trials=1, storage=url, runs_dir=str(tmp_path), name="s", img_size=32, epochs=2
        )
    message = str(err.value)
    assert f"needs the database driver '{module}'" in message and "pip install 'transferkit[postgres]'" in message
    assert "secret" not in message
    assert not (tmp_path / "s").exists()  # refused before the study's folder was made


# --- 10: lr-find showed nothing for minutes, swept 100 batches of a tiny set, wrote into the current folder


def test_lr_find_sizes_its_sweep_to_the_data_shows_progress_and_writes_a_folder_under_runs(
    shapes_dir, tmp_path, monkeypatch
):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    out = CliRunner().invoke(app, ["lr-find", str(shapes_dir), "--img-size", "32", "--batch-size", "8"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    # 16 training images of 20 (val and test carved), 2 batches of 8: 3 passes are 6 steps, raised to 10
    assert summary["steps"] == sweep_steps(2) == MIN_STEPS
    folder = here / "runs" / "lr-find-shapes-finetune"
    assert summary["dir"] == str(Path("runs") / "lr-find-shapes-finetune")
    assert [p.name for p in here.iterdir()] == ["runs"]  # nothing else in the current folder
    saved = json.loads((folder / "lr_find.json").read_text())
    assert len(saved["lrs"]) == len(saved["losses"]) == len(saved["smoothed"]) == 10
    best = min(range(10), key=saved["smoothed"].__getitem__)
    assert saved["suggestion"] == pytest.approx(saved["lrs"][best] / 10) == pytest.approx(summary["suggested_lr"])
    assert (folder / "lr_find.png").stat().st_size > 1000
    assert "LR sweep 2/10: lr " in out.stderr and "LR sweep 8/10" in out.stderr  # progress while it runs
    assert f"wrote {folder.relative_to(here) / 'lr_find.png'} and" in out.stderr  # where the files went
    again = CliRunner().invoke(app, ["lr-find", str(shapes_dir), "--img-size", "32", "--steps", "12"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["dir"].endswith("lr-find-shapes-finetune-2")
    bad = CliRunner().invoke(app, ["lr-find", str(shapes_dir), "--steps", "3"])
    assert isinstance(bad.exception, UserError) and str(bad.exception).startswith("--steps must be at least 10 (")
    assert sweep_steps(1000) == MAX_STEPS


# --- 12: an argument error took seconds, torch being imported first ------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "builtin:faces", "--batch-size", "0"], "error: --batch-size must be >= 1; got 0."),
        (["train", "builtin:faces", "--strategy", "linear_probe"], "Did you mean 'linear-probe'?"),
        (["train", "builtin:faces", "--lr", "fast"], "error: --lr must be a positive number or 'auto'; got 'fast'."),
        (
            ["train", "builtin:faces", "--label-smoothing", "1"],
            "error: --label-smoothing must be >= 0 and < 1; got 1.0.",
        ),
        (["tune", "builtin:faces", "--trials", "2", "--epochs", "0"], "error: --epochs must be >= 1; got 0."),
    ],
)
def test_a_bad_option_value_is_refused_before_torch_is_imported(args, message):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "transferkit", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "transferkit.core.checks" in imported and "typer" in imported  # the listing is there...
    assert not {"torch", "timm", "numpy"} & set(imported)  # ...without any heavy module


# --- 11: options that do nothing in the chosen strategy, search fields dropped, step: 0 ------------------


@pytest.mark.parametrize(
    "values,groups,warning",
    [
        (
            {"strategy": "linear-probe", "layer_decay": 0.75},
            None,
            "--layer-decay 0.75 is ignored: strategy linear-probe",
        ),
        ({"strategy": "linear-probe", "unfreeze_groups": 5}, None, "--unfreeze-groups 5 is ignored: strategy linear-"),
        ({"unfreeze_groups": 99}, 8, "--unfreeze-groups 99 is more than the backbone's 8 layer groups: all 8 train"),
        ({"layer_decay": 0.75, "lr_min": 1e-5}, None, "--layer-decay 0.75 wins, --lr-min is ignored"),
        ({"layer_decay": 0.75, "backbone_lr_mult": 0.3}, None, "--backbone-lr-mult is ignored: --layer-decay sets"),
    ],
)
def test_an_option_the_strategy_ignores_gets_a_warning(values, groups, warning):
    notes = ignored_options(TrainConfig(**values), n_groups=groups)
    assert len(notes) == 1 and warning in notes[0], notes
    assert ignored_options(TrainConfig(**values), given=set(), n_groups=None) == []  # none given
    assert ignored_options(TrainConfig(unfreeze_groups=8, layer_decay=0.75), n_groups=8) == []  # all used


def test_a_search_step_of_0_is_refused():
    with pytest.raises(UserError, match=r"search field 'layer_decay' in 's.yaml': step must be above 0.*got step: 0"):
        parse_search({"layer_decay": {"low": 0.6, "high": 0.9, "step": 0}}, "'s.yaml'")
    with pytest.raises(UserError, match="step must be above 0 and a whole number"):
        parse_search({"unfreeze_groups": {"low": 1, "high": 5, "step": 0.5}}, "'s.yaml'")


def test_tune_warns_of_a_search_field_a_flag_fixes_and_of_an_option_the_strategy_ignores(tmp_path):
    (tmp_path / "study.yaml").write_text(
        "search:\n  lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n  head_dropout: [0.0, 0.3]\n"
    )
    args = [*TINY, "--strategy", "linear-probe", "--layer-decay", "0.8", "--lr", "0.01", "--trials", "1"]
    out = CliRunner().invoke(
        app,
        ["tune", "builtin:faces", *args, "--config", str(tmp_path / "study.yaml"), "--runs-dir", str(tmp_path)],
    )
    assert out.exit_code == 0, out.output
    assert "warning: search field 'lr' is left out: --lr 0.01 fixes it for every trial" in out.stderr
    assert "warning: --layer-decay 0.8 is ignored: strategy linear-probe does not use it" in out.stderr
    assert "searching head_dropout in {0.0, 0.3}" in out.stderr  # and what is searched


# --- 15: third-party warnings reached the user ------------------------------------------------------------


def test_the_cli_keeps_torch_s_deprecation_and_pytree_lines_from_the_user(tmp_path, topics_csv):
    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    runs = ["--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-report", "--epochs", "1"]
    said = cli("train", str(topics_csv), *runs, "--name", "text")  # imports transformers, which brings torchao
    said += cli("train", "builtin:faces", *runs, "--name", "img", "--strategy", "linear-probe", "--img-size", "32")
    said += cli("export", str(tmp_path / "runs" / "img"), "--format", "torchscript")  # torch.jit.trace and load
    assert "[transferkit] best epoch 1" in said and "parity on 30 inputs" in said  # what transferkit says stays
    for noise in ("FutureWarning", "torch.jit", "_pytree", "Enum subclass", "warnings.warn"):
        assert noise not in said, said


def test_the_filters_name_the_message_and_the_module(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        quiet_third_party()  # twice: no second logging filter
        for module in ("torch.jit._trace", "mine"):
            warnings.warn_explicit("`torch.jit.trace` is deprecated.", FutureWarning, "x.py", 1, module=module)
        warnings.warn_explicit("something else", FutureWarning, "x.py", 1, module="torch.jit._trace")
    assert [(str(w.message), w.filename) for w in seen] == [
        ("`torch.jit.trace` is deprecated.", "x.py"),  # from another module: shown
        ("something else", "x.py"),  # another message of torch.jit: shown
    ]
    assert len(logging.getLogger("torch.utils._pytree").filters) == 1
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
