import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.core.errors import UserError


def test_compare_runs_every_arm_on_the_same_split_and_writes_its_files(shapes_dir, tmp_path):
    out = CliRunner().invoke(
        app,
        [
            "compare",
            str(shapes_dir),
            "--strategies",
            "linear-probe,scratch",
            "--shots",
            "2,4",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--img-size",
            "32",
            "--runs-dir",
            str(tmp_path),
            "--name",
            "study",
            "--quiet",
        ],
    )
    assert out.exit_code == 0, out.output
    study = tmp_path / "study"
    result = json.loads((study / "compare.json").read_text())
    assert len(result["arms"]) == 2 * 2 * 2
    for k in (2, 4):
        for seed in (0, 1):
            splits = [
                json.loads((study / f"{s}-{k}shot-seed{seed}" / "split.json").read_text())["splits"]
                for s in ("linear-probe", "scratch")
            ]
            assert splits[0] == splits[1]  # every strategy sees the same images
            assert len(splits[0]["train"]) == 2 * k
    rows = list(csv.DictReader((study / "compare.csv").open()))
    assert {(r["strategy"], r["shots"]) for r in rows} == {
        (s, k) for s in ("linear-probe", "scratch") for k in ("2", "4")
    }
    for r in rows:
        accs = [
            a["test_accuracy"]
            for a in result["arms"]
            if a["strategy"] == r["strategy"] and str(a["shots"]) == r["shots"]
        ]
        assert abs(float(r["test_accuracy_mean"]) - sum(accs) / len(accs)) < 1e-9
    assert Image.open(study / "compare.png").size[0] > 100
    page = (study / "report.html").read_text()  # the study's report: every arm's accuracy, the plot embedded
    assert page.count('class="arm-accuracy"') == len(result["arms"])
    assert "data:image/png;base64," in page
    assert not (study / "linear-probe-2shot-seed0" / "report.html").exists()  # arms skip their own
    assert "linear-probe" in out.stdout
    assert "±" in out.stdout


def test_a_second_study_never_replaces_the_first(shapes_dir, tmp_path):
    from transferkit.training.compare import compare

    first = tmp_path / "compare-shapes"
    first.mkdir()
    (first / "compare.json").write_text("{}")  # an earlier study's summary
    with pytest.raises(UserError, match="Study folder .* already exists"):
        compare(str(shapes_dir), ["linear-probe"], runs_dir=str(tmp_path), name="compare-shapes")
    second = compare(
        str(shapes_dir), ["linear-probe"], runs_dir=str(tmp_path), quiet=True, epochs=1, img_size=32, html_report=False
    )
    assert (first / "compare.json").read_text() == "{}"
    assert Path(second["arms"][0]["run"]).parent == tmp_path / "compare-shapes-2"


def test_compare_rejects_unknown_strategy(shapes_dir, tmp_path):
    out = CliRunner().invoke(
        app, ["compare", str(shapes_dir), "--strategies", "linear-probe,lpft", "--runs-dir", str(tmp_path)]
    )
    assert out.exit_code != 0
    assert "Did you mean 'lp-ft'" in str(out.exception)
