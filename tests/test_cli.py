import csv
import io
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from transferkit.cli import app

runner = CliRunner()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True)


def test_train_evaluate_predict_from_the_command_line(shapes_dir, tmp_path):
    runs = tmp_path / "runs"
    result = runner.invoke(
        app,
        [
            "train",
            str(shapes_dir),
            "--strategy",
            "linear-probe",
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--runs-dir",
            str(runs),
            "--name",
            "cli",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["run"].endswith("cli") and 0.0 <= summary["test_accuracy"] <= 1.0

    result = runner.invoke(app, ["evaluate", str(runs / "cli"), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["accuracy"] == summary["test_accuracy"]

    result = runner.invoke(
        app, ["predict", str(runs / "cli"), str(shapes_dir / "circle"), "--format", "json", "--top-k", "1"]
    )
    preds = json.loads(result.stdout)
    assert len(preds) == 10 and all(p["label"] in ("circle", "square") for p in preds)

    result = runner.invoke(app, ["predict", str(runs / "cli" / "best"), "--split", "test", "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 2 and {r["true"] for r in rows} == {"circle", "square"}

    assert (runs / "cli" / "report.html").is_file()  # written by train (default on)
    result = runner.invoke(app, ["report", str(runs / "cli")])
    assert result.exit_code == 0 and result.stdout.strip().endswith("report.html")
    result = runner.invoke(app, ["evaluate", str(runs / "cli"), "--tta", "flip"])
    assert result.exit_code == 0 and "TTA flip: test accuracy" in result.stdout, result.output
    result = runner.invoke(
        app, ["predict", str(runs / "cli"), str(shapes_dir / "circle"), "--tta", "flip-crop", "--format", "json"]
    )
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 10
    result = runner.invoke(app, ["export", str(runs / "cli"), "--format", "onnx"])
    assert result.exit_code == 0 and "top-1 agreement 1.000" in result.stdout, result.output
    result = runner.invoke(
        app, ["predict", str(runs / "cli"), str(shapes_dir / "circle"), "--backend", "onnx", "--format", "json"]
    )
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 10, result.output
    result = runner.invoke(app, ["inspect", "efficientnet_lite0"])
    assert result.exit_code == 0 and "group 0:" in result.stdout and "lp-ft:" in result.stdout

    # the saved config is reusable as --config, flags override it
    result = runner.invoke(
        app, ["train", "--config", str(runs / "cli" / "config.yaml"), "--name", "again", "--epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    assert (runs / "again" / "best" / "model.json").is_file()


def test_models_lists_the_bundled_backbones():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert name in result.stdout
    assert "bundled" in result.stdout
    result = runner.invoke(app, ["models", "resnet5"])
    assert "resnet50" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "no/such/dir"], "Data 'no/such/dir' not found"),
        (["train", "builtin:faces", "--model", "resnet5O"], "Did you mean 'resnet50'"),
        (["train", "builtin:faces", "--model", "resnet50"], "No pretrained weights for 'resnet50'"),
        (["predict", "no_run", "x.jpg"], "is not a transferkit model"),
    ],
)
def test_user_errors_are_one_message_and_exit_2(args, message):
    out = _cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["predict", "run", "x.jpg", "--top-k", "0"], "--top-k must be 1 or more; got 0."),
        (["predict", "run", "x.jpg", "--limit", "-1"], "--limit must be 1 or more; got -1."),
        (["predict", "run", "x.jpg", "--split", "test"], "Give inputs or --split, not both"),
        (["predict", "run", "--split", "TEST"], "--split must be train, val or test; got 'TEST'"),
        (["predict", "run", "x.jpg", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
        (["report", "run", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
        (["evaluate", "run", "--precision", "bogus"], "precision must be auto, bf16 or fp32; got 'bogus'"),
        (["evaluate", "run", "--format", "csv"], "--format must be table or json; got 'csv'"),
        (["inspect", "efficientnet_lite0", "--img-size", "-5"], "--img-size must be 16 or more; got -5"),
    ],
)
def test_options_out_of_range_are_named_before_any_work(args, message):
    from transferkit.core.errors import UserError

    result = runner.invoke(app, args)
    assert isinstance(result.exception, UserError) and message in str(result.exception), result.output


def test_bad_config_key_and_empty_folder(tmp_path):
    (tmp_path / "c.yaml").write_text("data: builtin:faces\nlearning_rat: 0.1\n")
    out = _cli("train", "--config", str(tmp_path / "c.yaml"))
    assert out.returncode == 2 and "Unknown key 'learning_rat'" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "empty").mkdir()
    out = _cli("train", str(tmp_path / "empty"))
    assert out.returncode == 2 and "No images found" in out.stderr


def test_a_full_disk_outside_atomic_writes_ends_with_one_message_and_exit_74():
    """A write transferkit does not make itself (a tuning study's SQLite file, the report) that finds the disk
    full ends like the others: one message, exit code 74, no traceback."""
    script = (
        "import sqlite3, transferkit.cli as cli\n"
        "def full(): raise sqlite3.OperationalError('database or disk is full')\n"
        "cli.app = full\ncli.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 74, out.stderr
    assert out.stderr.startswith("error: The disk is full") and "Traceback" not in out.stderr


def test_loading_pauses_the_collector_for_imports_and_freezes_what_they_made():
    import gc

    from transferkit.cli.startup import loading

    made = []
    try:
        with loading():
            assert not gc.isenabled()
            made.extend([i] for i in range(1000))  # 1000 tracked objects, as imports make
        assert gc.isenabled() and gc.get_freeze_count() >= 1000
        with pytest.raises(ImportError), loading():  # a failed import leaves the collector as it found it
            import transferkit_no_such_module  # noqa: F401
        assert gc.isenabled()
        gc.disable()
        with loading():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
        gc.unfreeze()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_heap_sets_glibcs_thresholds_in_a_fresh_process():
    code = (
        "import torch; from transferkit.cli.startup import keep_heap; assert keep_heap(); "
        "x = torch.randn(64, 96, 48, 48); assert torch.equal(x.clone(), x)"
    )  # 56 MB blocks still allocate
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
