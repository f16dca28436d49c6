"""Issue 37, a new user's first hour: the defects found, each fed the input that showed it (items 1, 2, 8, 9,
13 and parts of 16)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_folder
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.data.sources import config_data, load_data

runner = CliRunner()


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- 1: an image CSV whose header has no label column ---------------------------------------------------


def test_a_csv_header_without_a_label_column_is_refused_naming_the_columns(tmp_path):
    make_folder(tmp_path / "imgs", per_class=3, size=32)
    rows = ["path,split"] + [
        f"imgs/{c}/{i}.png,{'train' if i else 'test'}" for c in ("circle", "square") for i in range(3)
    ]
    labels = _csv(tmp_path / "labels.csv", rows)
    with pytest.raises(UserError) as err:
        load_data(str(labels))
    assert f"{labels}:1: no column 'label'; columns found: path, split." in str(err.value)
    assert "rename the column holding the class names to label" in str(err.value)


def test_a_csv_header_of_other_names_is_recognised_as_a_header(tmp_path):
    make_folder(tmp_path / "imgs", per_class=3, size=32)
    rows = ["file,category"] + [f"imgs/{c}/{i}.png,{c}" for c in ("circle", "square") for i in range(3)]
    labels = _csv(tmp_path / "labels.csv", rows)
    out = runner.invoke(app, ["train", str(labels), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert out.exit_code != 0
    assert isinstance(out.exception, UserError)
    assert "no column 'path' or 'label'; columns found: file, category" in str(out.exception)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_csv_header_may_name_its_columns_in_any_order(tmp_path):
    make_folder(tmp_path / "imgs", per_class=3, size=32)
    rows = ["split,label,path"] + [f"train,{c},imgs/{c}/{i}.png" for c in ("circle", "square") for i in range(3)]
    data = load_data(str(_csv(tmp_path / "labels.csv", rows)), val_fraction=0.0, test_fraction=0.0)
    assert data.classes == ["circle", "square"]
    assert len(data.splits["train"]) == 6
    assert data.skipped == []


def test_a_csv_without_a_header_still_reads_its_first_row(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2, size=32)
    rows = [f"imgs/{c}/{i}.png,{c}" for c in ("circle", "square") for i in range(2)]
    data = load_data(str(_csv(tmp_path / "labels.csv", rows)), val_fraction=0.0, test_fraction=0.0)
    assert sorted(Path(ref).name for ref, _ in data.splits["train"]) == ["0.png", "0.png", "1.png", "1.png"]


# --- 13: image CSV errors name file.csv:LINE, the line in the file --------------------------------------


def test_image_csv_errors_name_the_line_of_the_file(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2, size=32)
    lines = ["path,label", "imgs/circle/0.png,circle", "", "imgs/square/0.png,square", "imgs/square/1.png"]
    labels = _csv(tmp_path / "labels.csv", lines)  # the bad row is the 5th line, the 3rd data row
    with pytest.raises(UserError) as err:
        load_data(str(labels))
    assert str(err.value).startswith(f"{labels}:5: expected path,label[,split]; got 'imgs/square/1.png'.")
    lines[-1] = "imgs/square/1.png,square,training-set"
    with pytest.raises(UserError) as err:
        load_data(str(_csv(labels, lines)))
    assert str(err.value).startswith(f"{labels}:5: split 'training-set' is not train, val or test")


# --- 2: fewer than 2 classes; classes too small for the carved splits -------------------------------------


def test_one_class_folder_is_refused_before_a_run_folder_is_made(tmp_path):
    root = tmp_path / "one"
    make_folder(tmp_path / "shapes", per_class=4, size=32)
    shutil.copytree(tmp_path / "shapes" / "circle", root / "circle")
    with pytest.raises(UserError) as err:
        transferkit.train(data=str(root), img_size=32, epochs=1, runs_dir=str(tmp_path / "runs"), quiet=True)
    message = str(err.value)
    assert message.startswith(f"Data '{root}' has a single class ('circle') in its training split;")
    assert "needs two or more" in message
    assert f"{root / 'circle'}/ and {root / 'OTHER'}/" in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_one_class_csv_is_refused_and_check_says_so(tmp_path):
    make_folder(tmp_path / "imgs", per_class=3, size=32)
    labels = _csv(tmp_path / "l.csv", [f"imgs/circle/{i}.png,circle" for i in range(3)])
    with pytest.raises(UserError, match=r"single class \('circle'\).*rows of two classes or more"):
        config_data(TrainConfig(data=str(labels)))
    out = runner.invoke(app, ["check", str(labels)])
    assert out.exit_code == 1
    assert "has a single class ('circle')" in out.stdout


def test_every_class_with_one_image_is_named_as_missing_from_val_and_test(tmp_path, capsys):
    root = tmp_path / "ones"
    make_folder(tmp_path / "shapes", per_class=1, size=32)
    shutil.copytree(tmp_path / "shapes", root)
    data = load_data(str(root))
    assert data.splits["val"] == data.splits["test"] == []
    assert data.missing() == {"circle": ["val", "test"], "square": ["val", "test"]}
    # asked for no val and no test: nothing is missing
    assert load_data(str(root), val_fraction=0.0, test_fraction=0.0).missing() == {}
    out = runner.invoke(app, ["check", str(root)])
    assert "class 'circle' has no images in val and test" in out.stdout
    assert "class 'square' has no images in val and test" in out.stdout
    transferkit.train(
        data=str(root), strategy="linear-probe", img_size=32, epochs=1, runs_dir=str(tmp_path / "runs"), quiet=True
    )
    said = capsys.readouterr().err
    for name in ("circle", "square"):
        assert f"warning: class '{name}' has 1 image, too few for every split: none in val and test" in said


# --- a small trained run for the predict and evaluate items --------------------------------------------


def _folder_with_a_bad_file(root: Path) -> Path:
    make_folder(root, per_class=2, size=32)
    (root / "circle" / "broken.png").write_bytes(b"not a png")
    return root


# --- 8: one unreadable file in a predict batch ----------------------------------------------------------


def test_predict_skips_an_unreadable_file_with_a_warning_and_predicts_the_rest(run_dir, tmp_path):
    folder = _folder_with_a_bad_file(tmp_path / "new")
    out = runner.invoke(app, ["predict", str(run_dir), str(folder), "--format", "json"])
    assert out.exit_code == 0, out.output
    preds = json.loads(out.stdout)
    assert sorted(Path(p["input"]).name for p in preds) == ["0.png", "0.png", "1.png", "1.png"]
    assert "[transferkit] warning: skipped 1 input(s) that cannot be read; predicted the other 4:" in out.stderr
    assert f"{folder / 'circle' / 'broken.png'}: not an image (Pillow cannot identify its format)" in out.stderr


def test_predict_with_nothing_readable_says_so(run_dir, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    (tmp_path / "bad" / "b.png").write_bytes(b"junk")
    out = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "bad")])
    assert isinstance(out.exception, UserError)
    message = str(out.exception)
    assert message.startswith(f"None of the 2 inputs can be read as an image, e.g. {tmp_path / 'bad' / 'a.jpg'}: ")
    assert "empty file (0 bytes)" in message
    out = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "bad" / "b.png")])
    assert str(out.exception) == (
        f"Cannot read image '{tmp_path / 'bad' / 'b.png'}': not an image (Pillow cannot identify its format). "
        "Give an image file that opens."
    )


def test_the_library_still_raises_on_an_unreadable_file_unless_asked_to_skip(run_dir, tmp_path):
    folder = _folder_with_a_bad_file(tmp_path / "new")
    clf = transferkit.load(run_dir)
    with pytest.raises(UserError, match="broken.png"):
        clf.predict([str(folder)])
    skipped: list = []
    assert len(clf.predict([str(folder)], skipped=skipped)) == 4
    assert [Path(name).name for name, _ in skipped] == ["broken.png"]


# --- 9: rich markup in file names, class names and the log prefix ---------------------------------------


def test_file_and_class_names_with_brackets_print_as_they_are(run_dir, tmp_path):
    make_folder(tmp_path / "odd", per_class=1, size=32)
    shutil.copy(tmp_path / "odd" / "circle" / "0.png", tmp_path / "cat[red]1.png")
    out = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "cat[red]1.png")])
    assert out.exit_code == 0, out.output
    assert "cat[red]1.png" in out.stdout
    (tmp_path / "odd" / "square" / "[bold]x.png").write_bytes(b"")
    out = runner.invoke(app, ["check", str(tmp_path / "odd")])  # its table lists the file left out
    assert "[bold]x.png" in out.stdout


def test_the_log_prefix_shows_in_a_terminal():
    import io

    from rich.console import Console

    from transferkit.core.progress import Reporter

    report = Reporter()
    report.console, report.quiet = Console(file=io.StringIO(), force_terminal=True, width=120), False
    report.info("[transferkit] warning: skipped 1 file(s), e.g. data/cat[red]1.jpg")
    assert "[transferkit] warning: skipped 1 file(s), e.g. data/cat[red]1.jpg" in report.console.file.getvalue()


# --- 16: the predict table, --split paths, evaluate's output, --version ---------------------------------


def test_the_predict_table_top_k_starts_with_the_top_1_as_json_does(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # the table fits the terminal: this one's rows fit on one line
    make_folder(tmp_path / "new", per_class=1, size=32)
    image = str(tmp_path / "new" / "circle" / "0.png")
    pred = json.loads(runner.invoke(app, ["predict", str(run_dir), image, "--format", "json"]).stdout)[0]
    first, second = pred["top_k"]
    out = runner.invoke(app, ["predict", str(run_dir), image])
    row = next(line for line in out.stdout.splitlines() if "0.png" in line)
    assert f"{first['label']} {first['score']:.2f}, {second['label']} {second['score']:.2f}" in row


def test_split_test_shows_paths_relative_to_the_current_folder(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir.parent.parent)  # the folder holding shapes/ and runs/
    out = runner.invoke(app, ["predict", str(run_dir), "--split", "test", "--format", "json"])
    assert out.exit_code == 0, out.output
    preds = json.loads(out.stdout)
    assert sorted(p["input"] for p in preds) == sorted(
        f"shapes/test/{c}/{i}.png" for c in ("circle", "square") for i in range(4)
    )
    assert {p["true"] for p in preds} == {"circle", "square"}
    assert all(p["true"] == p["input"].split("/")[2] for p in preds)


def test_evaluate_prints_a_summary_line_and_the_confusion_matrix_as_a_table(run_dir):
    out = runner.invoke(app, ["evaluate", str(run_dir), "--precision", "fp32"])
    assert out.exit_code == 0, out.output
    metrics = json.loads((run_dir / "eval_test.json").read_text())
    lines = out.stdout.splitlines()
    assert lines[0] == (
        f"{run_dir} on its test split (8 images): accuracy {metrics['accuracy']:.4f}, macro-F1 "
        f"{metrics['macro_f1']:.4f}; inference in fp32"
    )
    assert metrics["classes"] == ["circle", "square"]
    assert "confusion matrix (rows true, columns predicted)" in out.stdout
    (circle_row,) = [line for line in lines if line.startswith("│ circle") and line.count("│") == 4]
    assert [int(n) for n in circle_row.strip("│ ").split("│")[1:]] == metrics["confusion_matrix"][0]
    assert "[[" not in out.stdout


def test_version():
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0
    assert out.stdout == f"transferkit {transferkit.__version__}\n"


def test_an_image_error_ending_in_a_period_is_not_doubled(tmp_path, monkeypatch):
    from PIL import Image

    from transferkit.data.images import open_image

    def fails(path):
        raise OSError("broken data stream when reading image file.")

    monkeypatch.setattr(Image, "open", fails)
    with pytest.raises(UserError) as err:
        open_image(tmp_path / "a.jpg")
    assert str(err.value) == (
        f"Cannot read image '{tmp_path / 'a.jpg'}': broken data stream when reading image file. "
        "Remove or replace the file."
    )
