import json

import pytest
import torch

import transferkit
import transferkit.loop as loop
from transferkit.errors import UserError


class _Preempted(Exception):
    pass


def _interrupt_after(monkeypatch, epoch_to_stop: int):
    """Make the run die right after the checkpoint of `epoch_to_stop` is written."""
    real = loop.save_checkpoint

    def save_then_maybe_die(*args, **kwargs):
        real(*args, **kwargs)
        if args[7] == epoch_to_stop:  # the epoch argument
            raise _Preempted

    monkeypatch.setattr(loop, "save_checkpoint", save_then_maybe_die)


def _final_weights(run_dir):
    return torch.load(run_dir / "last.ckpt", weights_only=True)["model"]


@pytest.mark.parametrize("stop_after", [1, 2])  # 1: a phase boundary of gradual; 2: inside the last phase
def test_resumed_gradual_run_ends_bit_identical_to_an_uninterrupted_one(shapes_dir, tiny, monkeypatch, stop_after):
    common = {**tiny, "data": str(shapes_dir), "strategy": "gradual", "epochs": 3, "gradual_every": 1}
    common["epochs"] = 4 if stop_after == 2 else 3
    whole = transferkit.train(name="whole", **common)

    _interrupt_after(monkeypatch, stop_after)
    with pytest.raises(_Preempted):
        transferkit.train(name="cut", **common)
    monkeypatch.undo()
    resumed = transferkit.train(resume=whole.dir.parent / "cut", quiet=True)

    a, b = _final_weights(whole.dir), _final_weights(resumed.dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    rows = [json.loads(line) for line in (resumed.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, common["epochs"] + 1))
    assert resumed.metrics["test"]["accuracy"] == whole.metrics["test"]["accuracy"]


def test_resume_refuses_config_changes_and_missing_checkpoints(tmp_path, shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", **tiny)
    with pytest.raises(UserError, match="cannot change model"):
        transferkit.train(resume=run.dir, model="resnet18")
    (run.dir / "last.ckpt").unlink()
    with pytest.raises(UserError, match="needs config.yaml and last.ckpt"):
        transferkit.train(resume=run.dir)
