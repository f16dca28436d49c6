"""Several processes on CPU (torchrun + gloo) train what one process trains.

The multi-process tests start real torchrun process groups: 2 ranks on this machine's cores, on the CPU
also where a GPU is present (the fp32 equalities hold on the CPU; NCCL is test_cuda's)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_folder
from helpers import assert_same_weights, torchrun, weights

import transferkit
from transferkit.core.distributed import Dist, check_batch, scaled_lr
from transferkit.core.errors import UserError
from transferkit.data.sampling import EpochSampler, StepBatches


def _keys(batches) -> list:
    return [list(b) for b in batches]


@pytest.mark.parametrize("n,batch,world,accumulate", [(37, 8, 2, 1), (37, 8, 2, 2), (40, 12, 3, 2), (9, 4, 1, 1)])
def test_step_batches_give_every_step_the_same_images_whatever_the_process_count(n, batch, world, accumulate):
    single = StepBatches(EpochSampler(n, seed=3), batch)
    single.set_epoch(2)
    steps = [set(b) for b in _keys(single)]
    ranks = []
    for rank in range(world):
        sb = StepBatches(EpochSampler(n, seed=3), batch, Dist(rank, world), accumulate)
        sb.set_epoch(2)
        ranks.append(_keys(sb))
        assert len(sb) == len(ranks[-1]) == len(sb.step_sizes()) * accumulate
    kept = StepBatches(EpochSampler(n, seed=3), batch, Dist(0, world), accumulate).step_sizes()
    for k, size in enumerate(kept):
        micro = [m for r in ranks for m in r[k * accumulate : (k + 1) * accumulate]]
        together = [key for m in micro for key in m]
        assert len(together) == size == len(set(together))  # nothing duplicated or lost
        assert set(together) == steps[k]
        assert all(len(m) >= 2 for m in micro)  # BatchNorm sees two images or more
    # a mid-epoch resume skips whole steps
    sb = StepBatches(EpochSampler(n, seed=3), batch, Dist(world - 1, world), accumulate)
    sb.set_epoch(2, skip_steps=1)
    assert _keys(sb) == ranks[-1][accumulate:]


def test_batch_checks_and_lr_scaling():
    with pytest.raises(UserError, match="batch_size 4 is the global batch.*use batch_size >= 8"):
        check_batch(4, 2, Dist(0, 4), 100)
    with pytest.raises(UserError, match="training split has 3 images"):
        check_batch(8, 1, Dist(0, 4), 3)
    assert scaled_lr(1e-3, 256, "linear", 32) == pytest.approx(8e-3)
    assert scaled_lr(1e-3, 128, "sqrt", 32) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 128, "none", 32) == 1e-3


def test_accumulation_gives_the_weights_of_the_whole_batch(shapes_dir, tiny):
    # BN in eval mode (lp-ft's FT phase) so that micro-batches see the same statistics
    # equal within 1e-5: an fp32 property (bf16 rounds each micro-batch's activations differently)
    # SGD, as below: with AdamW float-order noise in near-zero gradients became 1.9e-5 on a GPU machine's Xeon
    # (8.6e-6 here with AVX2 kernels); with SGD 6e-8, while 2 epochs move the weights by up to 1.4e-2
    common = {
        **tiny,
        "data": str(shapes_dir),
        "strategy": "lp-ft",
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-2,
        "optimizer": "sgd",
        "precision": "fp32",
        "device": "cpu",
    }
    one = transferkit.train(name="one", **common)
    acc = transferkit.train(name="acc", accumulate=2, **common)
    assert_same_weights(weights(one.dir), weights(acc.dir), atol=1e-5)
    assert json.loads((acc.dir / "runtime.json").read_text())["micro_batch"] == 4


def test_two_processes_train_what_one_trains(tmp_path, tiny):
    data = make_folder(tmp_path / "shapes40", per_class=20)  # train 32 = 4 global batches of 8
    # SGD: Adam's per-weight normalisation turns float-order noise in near-zero gradients into
    # lr-sized steps, which would compare the summation order of 1 and 2 threads, not DDP
    # within 1e-5 is an fp32 property: bf16 rounds the batch-of-4 and batch-of-8 activations differently
    flags = {
        **tiny,
        "data": str(data),
        "strategy": "lp-ft",
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-2,
        "keep_top_k": 2,
        "optimizer": "sgd",
        "precision": "fp32",
        "device": "cpu",
    }
    one = transferkit.train(name="one", **flags)
    cli = [
        str(data),
        "--name",
        "two",
        "--strategy",
        "lp-ft",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--img-size",
        "32",
        "--workers",
        "0",
        "--keep-top-k",
        "2",
        "--optimizer",
        "sgd",
        "--precision",
        "fp32",
        "--quiet",
        "--runs-dir",
        flags["runs_dir"],
    ]
    out = subprocess.run(torchrun(*cli), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    two = tmp_path / "runs" / "two"
    assert out.stdout.count('"run"') == 1  # rank 0 alone reports
    assert_same_weights(weights(one.dir), weights(two), atol=1e-5)
    got = json.loads((two / "metrics.json").read_text())
    for key in ("accuracy", "confusion_matrix", "n"):
        assert got["test"][key] == one.metrics["test"][key]
    assert got["test"]["loss"] == pytest.approx(one.metrics["test"]["loss"], abs=1e-5)
    assert got["runtime"]["processes"] == 2 and got["runtime"]["micro_batch"] == 4
    rows = [json.loads(r) for r in (two / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(r) for r in (one.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # one row per epoch: written once, by rank 0
    for a, b in zip(rows, want):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"]
    assert sorted(p.name for p in (two / "top").iterdir()) == sorted(p.name for p in (one.dir / "top").iterdir())


def test_gradual_under_ddp_needs_no_find_unused_parameters(tmp_path, shapes_dir, tiny):
    # DDP is built with find_unused_parameters=False: a frozen parameter registered with it would
    # make the second step fail. Each phase re-wraps the model over what trains then.
    flags = {**tiny, "data": str(shapes_dir), "strategy": "gradual", "epochs": 3, "batch_size": 4, "device": "cpu"}
    one = transferkit.train(name="one", **flags)
    cli = [
        str(shapes_dir),
        "--name",
        "two",
        "--strategy",
        "gradual",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--img-size",
        "32",
        "--workers",
        "0",
        "--quiet",
        "--runs-dir",
        flags["runs_dir"],
    ]
    out = subprocess.run(torchrun(*cli), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(r) for r in (one.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["groups"] for r in rows] == [r["groups"] for r in want]
    assert len(set(map(tuple, (r["groups"] for r in rows)))) == 3  # each epoch trained more groups


def test_sigterm_to_the_launcher_saves_once_and_two_processes_resume(tmp_path, shapes_dir):
    runs = tmp_path / "runs"
    cli = [
        sys.executable,
        "-m",
        "transferkit",
        "train",
        str(shapes_dir),
        "--devices",
        "2",
        "--device",
        "cpu",
        "--name",
        "cut",
        "--strategy",
        "finetune",
        "--epochs",
        "10",
        "--batch-size",
        "4",
        "--img-size",
        "32",
        "--workers",
        "0",
        "--save-every-steps",
        "1",
        "--quiet",
        "--runs-dir",
        str(runs),
    ]
    launcher = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = runs / "cut" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists():
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)  # --devices replaced the CLI process with torchrun itself
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, err[-3000:]
    assert "transferkit train --resume" in err
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) < (10, 0)  # stopped early, with its position
    assert len(state["rng_ranks"]) == 2  # one file with both ranks' streams, written by rank 0
    assert not list((runs / "cut").glob(".*.tmp"))

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferkit",
            "train",
            "--resume",
            str(runs / "cut"),
            "--devices",
            "2",
            "--device",
            "cpu",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((runs / "cut" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 10 and metrics["runtime"]["processes"] == 2


def test_more_processes_than_gpus_is_refused_before_any_starts(monkeypatch):
    from transferkit.core import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        UserError,
        match="--devices 2 starts one process per GPU, and this machine has 1. "
        "Use --devices 1, or --device cpu for 2 CPU processes.",
    ):
        distributed.check_gpus(2, None)
    distributed.check_gpus(2, "cpu")  # CPU ranks: as many as asked
    distributed.check_gpus(1, "cuda")
