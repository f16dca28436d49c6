"""Exact resume: at phase boundaries, inside phases, in the middle of an epoch, with 0 or 2 workers."""

import json
import signal

import pytest
import torch
from helpers import SignalAt, assert_same_weights, weights

import transferkit
import transferkit.training.recipe as recipe_module
from transferkit.core.errors import UserError
from transferkit.training.preempt import Preempted


class _Died(Exception):
    pass


def _die_after_checkpoint(monkeypatch, epoch: int, step: int = 0):
    """Make the run die right after it writes the checkpoint at (epoch epochs done, step batches)."""
    real = recipe_module.save_checkpoint

    def save_then_maybe_die(path, state):
        real(path, state)
        if (state["epoch"], state["step"]) == (epoch, step):
            raise _Died

    monkeypatch.setattr(recipe_module, "save_checkpoint", save_then_maybe_die)


@pytest.mark.parametrize("stop_after", [1, 2])  # 1: a phase boundary of gradual; 2: inside the last phase
def test_resumed_gradual_run_ends_bit_identical_to_an_uninterrupted_one(shapes_dir, tiny, monkeypatch, stop_after):
    common = {
        **tiny,
        "data": str(shapes_dir),
        "strategy": "gradual",
        "gradual_every": 1,
        "epochs": 4 if stop_after == 2 else 3,
    }
    whole = transferkit.train(name="whole", **common)

    _die_after_checkpoint(monkeypatch, stop_after)
    with pytest.raises(_Died):
        transferkit.train(name="cut", **common)
    monkeypatch.undo()
    resumed = transferkit.train(resume=whole.dir.parent / "cut", quiet=True)

    assert_same_weights(weights(whole.dir), weights(resumed.dir))
    rows = [json.loads(line) for line in (resumed.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, common["epochs"] + 1))
    assert resumed.metrics["test"]["accuracy"] == whole.metrics["test"]["accuracy"]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_then_resume_is_bit_identical(shapes_dir, tiny, workers):
    """16 training images, batch 4: 4 steps an epoch; the signal lands in epoch 2, batch 2."""
    common = {
        **tiny,
        "data": str(shapes_dir),
        "strategy": "finetune",
        "epochs": 3,
        "batch_size": 4,
        "workers": workers,
        "augment": "strong",
        "head_dropout": 0.3,
        "deterministic": True,
    }
    whole = transferkit.train(name="whole", **common)

    with pytest.raises(Preempted) as stopped:
        transferkit.train(name="cut", report=SignalAt(6), **common)
    assert stopped.value.exit_code == 143 and "epoch 2, step 2" in str(stopped.value)
    state = torch.load(whole.dir.parent / "cut" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = transferkit.train(resume=whole.dir.parent / "cut", quiet=True)
    assert_same_weights(weights(whole.dir), weights(resumed.dir))
    rows = [json.loads(line) for line in (resumed.dir / "metrics.jsonl").read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (whole.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in whole_rows]


def test_step_checkpoints_resume_bit_identical(shapes_dir, tiny, monkeypatch):
    common = {**tiny, "data": str(shapes_dir), "strategy": "lp-ft", "epochs": 2, "batch_size": 4, "save_every_steps": 3}
    whole = transferkit.train(name="whole", **common)
    _die_after_checkpoint(monkeypatch, epoch=1, step=2)  # global step 6: epoch 2 (the FT phase), batch 2
    with pytest.raises(_Died):
        transferkit.train(name="cut", **common)
    monkeypatch.undo()
    resumed = transferkit.train(resume=whole.dir.parent / "cut", quiet=True)
    assert_same_weights(weights(whole.dir), weights(resumed.dir))


def test_same_seed_gives_identical_weights_with_0_and_2_workers(shapes_dir, tiny):
    # at a fixed torch thread count (by default it follows the workers, and float sums follow threads)
    common = {
        **tiny,
        "data": str(shapes_dir),
        "strategy": "full",
        "epochs": 2,
        "batch_size": 4,
        "augment": "strong",
        "threads": 1,
    }
    a = transferkit.train(name="w0", **{**common, "workers": 0})
    b = transferkit.train(name="w2", **{**common, "workers": 2})
    assert_same_weights(weights(a.dir), weights(b.dir))


def test_resume_allows_more_epochs_and_refuses_changes_that_matter(tmp_path, shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="finetune", **tiny)
    with pytest.raises(UserError, match=r"changed model \('efficientnet_lite0' -> 'resnet18'\)"):
        transferkit.train(resume=run.dir, model="resnet18")
    longer = transferkit.train(resume=run.dir, epochs=2, quiet=True)
    rows = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and longer.metrics["epochs_run"] == 2
    assert "epochs: 2" in (run.dir / "config.yaml").read_text()
    with pytest.raises(UserError, match="has trained 2 epochs; resume it with --epochs 2 or more"):
        transferkit.train(resume=run.dir, epochs=1)


def test_an_lp_ft_run_in_its_fine_tune_takes_more_epochs_there(shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="lp-ft", **{**tiny, "epochs": 2})  # probe 1, tune 1
    transferkit.train(resume=run.dir, epochs=5, quiet=True)  # the default plan for 5 would probe 2 epochs
    rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["lp"] + ["ft"] * 4


def test_resume_refuses_missing_truncated_foreign_and_pickled_checkpoints(tmp_path, shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", **tiny)
    ckpt = run.dir / "last.ckpt"
    good = ckpt.read_bytes()

    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=f"Cannot read checkpoint '{ckpt}'.*truncated"):
        transferkit.train(resume=run.dir)

    torch.save({"weight": torch.ones(2)}, ckpt)  # loads fine, but is not a transferkit checkpoint
    with pytest.raises(UserError, match="is not a transferkit checkpoint"):
        transferkit.train(resume=run.dir)

    sentinel = tmp_path / "sentinel"
    torch.save({"model": _WritesSentinel(str(sentinel))}, ckpt)
    with pytest.raises(UserError, match="pickled Python objects.*--trust-checkpoint"):
        transferkit.train(resume=run.dir)
    assert not sentinel.exists()

    ckpt.unlink()
    with pytest.raises(UserError, match="needs config.yaml and last.ckpt"):
        transferkit.train(resume=run.dir)


class _WritesSentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
