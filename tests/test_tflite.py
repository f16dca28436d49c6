"""LiteRT (TFLite) export: fp32 parity with PyTorch, int8 judged by its test accuracy, and predict on the exports."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.deploy.export import export

pytestmark = needs("litert_torch", "ai_edge_litert")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One lite0 linear probe on the builtin digits at 48 px, 93 % on test (int8 needs a model with some margin:
    a 32 px fine-tune at 70 % lost 7 points to static int8; this one moves 0.3)."""
    runs = tmp_path_factory.mktemp("tflite")
    return transferkit.train(
        data="builtin:digits",
        strategy="linear-probe",
        img_size=48,
        batch_size=32,
        runs_dir=str(runs),
        quiet=True,
        workers=0,
        html_report=False,
    )


def _test_images(run, n: int | None = None) -> list:
    """The run's test images, decoded (the builtin sets live in arrays, not files)."""
    from transferkit.core.config import TrainConfig
    from transferkit.data.sources import config_data

    data = config_data(TrainConfig.load(run.dir / "config.yaml"), run.dir / "split.json")
    return [data.read(ref) for ref, _ in data.splits["test"][:n]]


def test_fp32_tflite_agrees_with_pytorch_and_predict_runs_it(run):
    result = export(run.dir, "tflite")
    assert Path(result["path"]).name == "model.tflite"
    assert result["precision"] == "fp32"
    assert result["max_abs_logit_diff"] <= 1e-3
    assert result["top1_agreement"] == 1.0
    assert result["images"] == 32
    images = _test_images(run)  # the whole test split: top-1 the same on >= 99 % of it
    lite, torch_clf = transferkit.load(run.dir, backend="tflite"), transferkit.load(run.dir, precision="fp32")
    got, want = lite.predict_proba(images), torch_clf.predict_proba(images)
    assert len(images) > 300
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert np.abs(got - want).max() < 1e-3
    flip = lite.predict_proba(images[:8], tta="flip")  # TTA as the other backends
    assert np.abs(flip - torch_clf.predict_proba(images[:8], tta="flip")).max() < 1e-3


def test_int8_reports_its_test_accuracy_change_and_is_a_quarter_of_the_size(run):
    result = CliRunner().invoke(app, ["export", str(run.dir), "--format", "tflite", "--int8"])
    assert result.exit_code == 0, result.output
    assert "(int8), change" in result.output
    record = json.loads((run.dir / "export" / "model.json").read_text())
    accuracy = record["parity"]["test_accuracy"]
    assert record["file"] == "model_int8.tflite"
    assert accuracy["images"] > 300
    assert accuracy["change"] >= -0.02
    assert accuracy["pytorch"] > 0.8  # within 2 points of the PyTorch model
    int8 = run.dir / "export" / "model_int8.tflite"
    assert int8.stat().st_size < 0.4 * (run.dir / "export" / "model.tflite").stat().st_size
    proba = transferkit.load(run.dir, backend="tflite-int8").predict_proba(_test_images(run, 8))
    assert proba.shape == (8, 10)
    assert np.allclose(proba.sum(1), 1, atol=1e-5)


def test_tflite_mistakes_are_named(run, tmp_path, monkeypatch):
    with pytest.raises(transferkit.UserError, match="--fp16 and --int8 are for --format tflite"):
        export(run.dir, "onnx", quantize="int8")
    with pytest.raises(transferkit.UserError, match="transferkit export .* --format tflite --fp16"):
        transferkit.load(tmp_path, backend="tflite-fp16")
    result = CliRunner().invoke(app, ["export", str(run.dir), "--format", "tflite", "--fp16", "--int8"])
    assert result.exit_code != 0
    assert "exclude each other" in str(result.exception)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "litert_torch" else real(name, *a)
    )
    with pytest.raises(transferkit.UserError, match=r"pip install 'transferkit\[tf\]'"):
        export(run.dir, "tflite")


def test_the_converters_native_log_lines_do_not_reach_the_user(run, tmp_path):
    """absl's notice, oneDNN's and the XNNPACK delegate's INFO line are written by C++ to file descriptor 2
    (a fresh process: absl says its notice once per process); they are kept unless the export fails."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "transferkit", "export", str(run.dir), "--format", "tflite", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "model.tflite").is_file()
    for line in ("absl::InitializeLog", "XNNPACK delegate", "oneDNN custom operations"):
        assert line not in out.stderr, out.stderr[-3000:]
