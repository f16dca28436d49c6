"""Issue 37, a new user's first hour: the defects found, each fed the input that showed it (items 1, 2, 8, 9,
13 and parts of 16)."""

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
        assert f"warning: class '{name}' has 1 image(s), too few for every split: none in val and test" in said
