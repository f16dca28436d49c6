"""The CUDA path on a real GPU: bf16 and channels_last training, torch.compile, exact resume in
deterministic mode, export parity of a CUDA-trained run, out-of-memory, NCCL DDP over the GPUs present.

Marked `cuda` (`pytest -m cuda`); skipped where PyTorch sees no GPU, as on CI."""

import gc
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_folder
from helpers import SignalAt, assert_same_weights, weights

import transferkit
from transferkit.core.errors import UserError
from transferkit.deploy.export import export
from transferkit.models.runtime import Runtime
from transferkit.training.preempt import Preempted

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def gpu(tiny) -> dict:
    return {**tiny, "device": "cuda"}


def _rows(run_dir) -> list[dict]:
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision,channels_last", [("bf16", True), ("fp32", False)])
def test_the_demo_job_on_the_gpu_learns_and_says_how_it_ran(tmp_path, precision, channels_last):
    run = transferkit.train(
        data="builtin:faces",
        device="cuda",
        precision=precision,
        channels_last=channels_last,
        runs_dir=str(tmp_path),
        quiet=True,
        html_report=False,
    )
    assert run.metrics["test"]["accuracy"] >= 0.95  # as on the CPU (test_train.test_demo_job_faces_defaults)
    runtime = json.loads((run.dir / "runtime.json").read_text())
    assert runtime["device"].startswith("cuda") and runtime["gpu"] == torch.cuda.get_device_name()
    assert runtime["precision"] == {"train": precision, "infer": precision}
    assert runtime["channels_last"] is channels_last and runtime["cudnn_benchmark"] and runtime["tf32"]
    for row in _rows(run.dir):
        assert 0.0 <= row["data_wait"] <= 1.0 and row["gpu_peak_gb"] > 0


def test_compiled_training_saves_plain_keys_and_learns(tmp_path, gpu):
    data = make_folder(tmp_path / "shapes", per_class=30)
    flags = {**gpu, "data": str(data), "strategy": "finetune", "epochs": 3, "batch_size": 16}
    compiled = transferkit.train(name="compiled", compile=True, **flags)
    eager = transferkit.train(name="eager", **flags)
    assert json.loads((compiled.dir / "runtime.json").read_text())["compile"] is True
    assert weights(compiled.dir).keys() == weights(eager.dir).keys()  # no _orig_mod. prefixes
    assert compiled.metrics["test"]["accuracy"] >= eager.metrics["test"]["accuracy"] - 0.2
    transferkit.load(compiled.dir, device="cuda")  # the bundle loads into a plain model


def test_the_demo_job_cropping_on_the_gpu_learns(faces_dir, tmp_path, monkeypatch):
    real, seen = Runtime.batch, []
    monkeypatch.setattr(Runtime, "batch", lambda self, images: seen.append(type(images)) or real(self, images))
    run = transferkit.train(
        data=str(faces_dir),
        device="cuda",
        crop_on="auto",  # auto crops on the GPU where the run is not deterministic
        img_size=96,
        runs_dir=str(tmp_path / "runs"),
        quiet=True,
        html_report=False,
    )
    assert list in seen  # training batches came as squares and crop rows
    assert run.metrics["test"]["n"] == 80
    assert run.metrics["test"]["accuracy"] >= 0.95  # as the demo job


DETERMINISTIC_LIMIT_S = 300
"""What the deterministic device-crop run is given: it once did not finish in the 110 s left of a device
call (a hang or slowness, not known; torchvision.ops.roi_align would swap in a Python version sampling every
input pixel per output pixel, so the op is called directly)."""


def test_the_demo_job_cropping_on_the_gpu_deterministically_finishes_and_learns(faces_dir, tmp_path):
    """In a process of its own with a time limit, so a hang fails this test with its reason instead of
    stalling the suite."""
    cli = [sys.executable, "-m", "transferkit", "train", str(faces_dir), "--device", "cuda", "--deterministic"]
    cli += ["--crop-on", "device", "--img-size", "96", "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-report"]
    try:
        out = subprocess.run(cli, capture_output=True, text=True, timeout=DETERMINISTIC_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"--deterministic with --crop-on device did not finish in {DETERMINISTIC_LIMIT_S} s")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] >= 0.95  # as the demo job


def test_sigterm_then_resume_is_bit_identical_on_the_gpu(shapes_dir, gpu):
    """As test_resume's CPU test: deterministic mode, bf16, the signal in epoch 2, batch 2."""
    common = {
        **gpu,
        "data": str(shapes_dir),
        "strategy": "finetune",
        "epochs": 3,
        "batch_size": 4,
        "augment": "strong",
        "head_dropout": 0.3,
        "deterministic": True,
        "precision": "bf16",
    }
    whole = transferkit.train(name="whole", **common)
    with pytest.raises(Preempted):
        transferkit.train(name="cut", report=SignalAt(6), **common)
    resumed = transferkit.train(resume=whole.dir.parent / "cut", quiet=True)
    assert_same_weights(weights(whole.dir), weights(resumed.dir))
    assert [r["train_loss"] for r in _rows(resumed.dir)] == [r["train_loss"] for r in _rows(whole.dir)]


def test_export_of_a_gpu_trained_run_agrees_with_pytorch_on_cpu_and_gpu(tmp_path, shapes_dir, gpu):
    data = make_folder(tmp_path / "split", per_class=16, splits=("train", "val", "test"))
    run = transferkit.train(data=str(data), strategy="finetune", **gpu)
    result = export(run.dir, "onnx")
    assert result["max_abs_logit_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    files = sorted(str(p) for p in (shapes_dir / "square").glob("*.png"))
    on_gpu = transferkit.load(run.dir, device="cuda", precision="fp32").predict_proba(files)
    onnx = transferkit.load(run.dir, backend="onnx").predict_proba(files)
    np.testing.assert_allclose(on_gpu, onnx, atol=5e-3)  # TF32 convolutions on the GPU


def test_out_of_memory_says_what_to_change_and_accumulation_resumes(tmp_path, gpu):
    """A real CUDA out-of-memory: the process may use 1 GiB more; 128 images of 224 px at once need more."""
    data = make_folder(tmp_path / "shapes", per_class=100)  # 160 training images
    flags = {
        **gpu,
        "data": str(data),
        "img_size": 224,
        "batch_size": 128,
        "strategy": "full",
        "epochs": 1,
        "precision": "bf16",
        "name": "oom",
    }
    gc.collect()  # what earlier tests in this process left: the 1 GiB comes on top of what stays
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_reserved() + 2**30
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:
        with pytest.raises(
            UserError,
            match=r"Out of GPU memory training micro-batches of 128 images.*"
            r"--accumulate 2`; or .*--batch-size \(e\.g\. 64\)",
        ):
            transferkit.train(**flags)
    finally:  # (training at the cap's edge crawls: the allocator frees and retries on every step)
        torch.cuda.set_per_process_memory_fraction(1.0)
    resumed = transferkit.train(resume=tmp_path / "runs" / "oom", accumulate=2)  # as the message says
    assert resumed.metrics["epochs_run"] == 1 and resumed.metrics["runtime"]["micro_batch"] == 64


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs 2 GPUs or more")
def test_nccl_processes_train_what_one_gpu_trains(tmp_path, gpu):
    n = torch.cuda.device_count()
    data = make_folder(tmp_path / "shapes", per_class=8 * n)
    flags = [
        "--strategy",
        "lp-ft",
        "--epochs",
        "2",
        "--batch-size",
        str(4 * n),
        "--lr",
        "1e-2",
        "--img-size",
        "32",
        "--workers",
        "0",
        "--optimizer",
        "sgd",
        "--precision",
        "fp32",
        "--device",
        "cuda",
        "--quiet",
        "--runs-dir",
        gpu["runs_dir"],
    ]
    one = subprocess.run(
        [sys.executable, "-m", "transferkit", "train", str(data), "--name", "one", *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    many = subprocess.run(
        [sys.executable, "-m", "transferkit", "train", str(data), "--name", "many", "--devices", str(n), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0 and many.returncode == 0, many.stderr[-3000:]
    runs = tmp_path / "runs"
    assert json.loads((runs / "many" / "metrics.json").read_text())["runtime"]["processes"] == n
    assert_same_weights(weights(runs / "one"), weights(runs / "many"), atol=1e-3)  # TF32 sums in another order


def test_uint8_batches_are_normalised_on_the_gpu_to_the_cpu_values():
    images = torch.randint(0, 256, (4, 24, 30, 3), dtype=torch.uint8)
    stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    on_gpu = Runtime(torch.device("cuda"), channels_last=True, normalize=stats)
    assert on_gpu.normalizes_on_device  # the loaders hand the GPU pixels
    want = Runtime(torch.device("cpu"), channels_last=True, normalize=stats).batch(images)
    got = on_gpu.batch(images).cpu()
    assert torch.equal(got, want), f"{(got != want).sum()} values differ, by up to {(got - want).abs().max():.3g}"


def test_crops_made_on_the_gpu_are_the_crops_made_on_the_cpu():
    squares = torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8)
    rows = torch.tensor([[3, 2, 20, 30, 0, 32], [5, 7, 13, 15, 1, 32], [0, 0, 40, 40, 1, 32]], dtype=torch.float32)
    stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    want = Runtime(torch.device("cpu"), channels_last=True, normalize=stats).batch([squares, rows])
    got = Runtime(torch.device("cuda"), channels_last=True, normalize=stats).batch([squares.pin_memory(), rows])
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == (3, 3, 32, 32)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
