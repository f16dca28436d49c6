"""Fault injection on real processes: SIGTERM, SIGKILL mid-write, NaN losses."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, weights

import transferkit
import transferkit.models.task as task_module
from transferkit.core.errors import UserError


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferkit", "train", *args]


def _wait_for(path, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_exits_143_and_resume_ends_bit_identical(shapes_dir, tmp_path):
    flags = [
        "--img-size",
        "32",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--deterministic",
        "--save-every-steps",
        "1",
        "--quiet",
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    whole = subprocess.run(_cli(str(shapes_dir), "--name", "whole", *flags), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    proc = subprocess.Popen(
        _cli(str(shapes_dir), "--name", "cut", *flags), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    _wait_for(tmp_path / "runs" / "cut" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "transferkit train --resume" in err
    state = torch.load(tmp_path / "runs" / "cut" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["step"]) < (4, 0)  # stopped early, with its position saved

    resumed = subprocess.run(
        _cli("--resume", str(tmp_path / "runs" / "cut"), "--quiet"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "runs" / "whole"), weights(tmp_path / "runs" / "cut"))


KILL_DURING_THIRD_SAVE = """
import io, os, signal, sys
import torch
real_save, count = torch.save, [0]

def save_half_then_die(obj, f, *args, **kwargs):
    count[0] += 1
    if count[0] < 3:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    with open(f, "wb") as fh:
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half_then_die
from transferkit.cli import main
sys.argv = ["transferkit", "train", *sys.argv[1:]]
main()
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(shapes_dir, tmp_path):
    script = tmp_path / "kill_mid_write.py"
    script.write_text(textwrap.dedent(KILL_DURING_THIRD_SAVE))
    run_dir = tmp_path / "runs" / "cut"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(shapes_dir),
            "--img-size",
            "32",
            "--epochs",
            "3",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--save-every-steps",
            "2",
            "--quiet",
            "--strategy",
            "linear-probe",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--name",
            "cut",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run_dir / ".last.ckpt.tmp").exists()  # the half-written file is there, beside the old one
    state = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)  # saves: step 2, epoch 1 end, then the killed one

    resumed = transferkit.train(resume=run_dir, quiet=True)
    assert resumed.metrics["epochs_run"] == 3
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def _head_returns_nan_at(monkeypatch, call: int):
    """Fault injection: the head's output becomes NaN on its `call`-th training forward pass."""
    _head_fault_at(monkeypatch, call, lambda output: output * float("nan"))


def _head_fault_at(monkeypatch, call: int, fault):
    """The head's `call`-th training forward pass returns `fault(output)` (which may raise): a hook on its
    last linear layer, whose output is the logits (the objective runs the head in two parts, to keep the
    pre-logit features for its terms)."""
    real = task_module.build_classifier
    calls = [0]

    def build(*args, **kwargs):
        model, record, prep = real(*args, **kwargs)

        def hook(module, inputs, output):
            # the model's own head: precision auto's timing probe trains a deep copy, hooks and all
            if module is model.head[-1] and module.training:
                calls[0] += 1
                if calls[0] == call:
                    return fault(output)
            return output

        model.head[-1].register_forward_hook(hook)
        return model, record, prep

    monkeypatch.setattr(task_module, "build_classifier", build)


def test_nan_loss_stops_naming_the_step_and_files_and_best_stays_finite(shapes_dir, tiny, monkeypatch):
    _head_returns_nan_at(monkeypatch, call=6)  # 4 steps an epoch: epoch 2, step 2
    with pytest.raises(UserError, match=r"loss is nan at epoch 2, step 2 \(batch of 4: .*shapes/.*\.png"):
        transferkit.train(data=str(shapes_dir), name="nan", **{**tiny, "epochs": 3, "batch_size": 4})
    best, meta = transferkit.deploy.bundle.load_bundle(tiny["runs_dir"] + "/nan/best")
    assert meta["metrics"]["best"]["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in best.state_dict().values() if p.is_floating_point())


def test_nan_policy_skip_skips_the_step_and_finishes(shapes_dir, tiny, monkeypatch):
    _head_returns_nan_at(monkeypatch, call=6)
    run = transferkit.train(data=str(shapes_dir), nan_policy="skip", **{**tiny, "epochs": 3, "batch_size": 4})
    assert run.metrics["nan_skipped_steps"] == 1
    assert run.metrics["epochs_run"] == 3
    assert all(
        math.isfinite(v)
        for v in torch.load(run.dir / "last.ckpt", weights_only=True)["model"]["head.1.weight"].flatten().tolist()
    )


def test_out_of_memory_saves_the_last_whole_step_and_says_how_to_go_on(shapes_dir, tiny, monkeypatch):
    def out_of_memory(output):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fault injected)")

    _head_fault_at(monkeypatch, 6, out_of_memory)  # 4 steps an epoch: epoch 2, step 2
    message = (
        r"Out of GPU memory training micro-batches of 4 images \(CUDA out of memory.*\)\. saved .*last\.ckpt "
        r"at step 1 of this epoch.*--resume .*oom --accumulate 2`; or .* smaller --batch-size \(e\.g\. 2\)"
    )
    with pytest.raises(UserError, match=message):
        transferkit.train(data=str(shapes_dir), name="oom", **{**tiny, "epochs": 3, "batch_size": 4})
    run_dir = Path(tiny["runs_dir"]) / "oom"
    state = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1)
    monkeypatch.undo()
    resumed = transferkit.train(resume=run_dir, accumulate=2)
    assert resumed.metrics["epochs_run"] == 3
    assert resumed.config.accumulate == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_keep_top_k_keeps_the_k_best_epochs(shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), keep_top_k=2, **{**tiny, "epochs": 4})
    kept = sorted(p.name for p in (run.dir / "top").iterdir())
    assert len(kept) == 2
    rows = [__import__("json").loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
    ranked = sorted(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]), reverse=True)
    assert kept == sorted(f"epoch-{r['epoch']:03d}" for r in ranked[:2])


def test_ctrl_c_to_the_process_group_with_loader_workers_exits_130(shapes_dir, tmp_path):
    """As a terminal's Ctrl-C: SIGINT to the trainer and its loader workers at once."""
    proc = subprocess.Popen(
        _cli(
            str(shapes_dir),
            "--img-size",
            "32",
            "--epochs",
            "20",
            "--batch-size",
            "4",
            "--workers",
            "2",
            "--save-every-steps",
            "1",
            "--quiet",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--name",
            "int",
        ),
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for(tmp_path / "runs" / "int" / "last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT received" in err


def test_a_fault_between_the_bundles_two_files_leaves_the_previous_bundle_whole(tmp_path, monkeypatch):
    import errno

    import transferkit.core.files as files
    from transferkit.core.errors import DiskFull
    from transferkit.deploy.bundle import bundle_dir, save_bundle

    best = tmp_path / "run" / "best"
    first = torch.nn.Linear(3, 2)
    save_bundle(best, first, {"epoch": 1})
    real = files.atomic_write

    def json_finds_the_disk_full(path, write, size=None, shown=None):
        def failing(tmp):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

        real(path, failing if Path(path).name == "model.json" else write, size, shown)

    monkeypatch.setattr(files, "atomic_write", json_finds_the_disk_full)
    with pytest.raises(DiskFull, match=f"writing '{best / 'model.json'}'"):
        save_bundle(best, torch.nn.Linear(3, 2), {"epoch": 2})  # its weights were written, its metadata not
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]  # no temp folder left
    assert json.loads((best / "model.json").read_text())["epoch"] == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(best / "model.safetensors")["weight"], first.weight.detach())
    os.replace(best, best.with_name(".best.old"))  # a crash between save_bundle's two renames
    assert bundle_dir(tmp_path / "run") == best.with_name(".best.old")


def test_a_full_disk_while_rewriting_metrics_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """metrics.json, the report and calibration.json go through files.write_text: half a file is never left."""
    import errno

    from transferkit.core import files
    from transferkit.core.errors import DiskFull

    path = tmp_path / "metrics.json"
    path.write_text('{"epoch": 1}')
    real = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(DiskFull, match="metrics.json"):
        files.write_text(path, '{"epoch": 2, "best": 0.5}')
    monkeypatch.undo()
    assert path.read_text() == '{"epoch": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
