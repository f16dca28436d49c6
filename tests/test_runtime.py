"""Runtime settings: the rules that pick threads and precision, and that they are applied and undone."""

import numpy as np
import pytest
import torch
from helpers import assert_same_weights, weights
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

import transferkit
from transferkit.core import machine
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.data.preprocessing import Preprocessing
from transferkit.data.transforms import DeviceCrop, pixels, resized_crops, train_transform
from transferkit.deploy.predictor import Predictor
from transferkit.models import runtime
from transferkit.models.classifier import build_classifier
from transferkit.models.runtime import Runtime
from transferkit.models.task import ImageTask

CPU = torch.device("cpu")


def _cores(monkeypatch, n: int) -> None:
    for module in (machine, runtime):  # where it is defined, and where resolve looks it up
        monkeypatch.setattr(module, "machine_cores", lambda: n)


def test_threads_leave_the_loader_workers_their_cores(monkeypatch):
    _cores(monkeypatch, 8)
    assert runtime.resolve(TrainConfig(workers=3), CPU, 3).threads == 5
    assert runtime.resolve(TrainConfig(workers=8), CPU, 8).threads == 1
    assert runtime.resolve(TrainConfig(threads=2), CPU, 3).threads == 2  # asked for: kept
    assert runtime.resolve(TrainConfig(), CPU, 0).threads == torch.get_num_threads()
    assert machine.default_workers(in_memory=False) == 4 and machine.default_workers(in_memory=True) == 0
    _cores(monkeypatch, 2)
    assert machine.default_workers(in_memory=False) == 0


def test_threads_applied_restores_the_count():
    before = torch.get_num_threads()
    with runtime.Runtime(threads=1).threads_applied():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_precision_choice_is_validated():
    with pytest.raises(UserError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def test_bf16_autocast_runs_the_model_in_bf16():
    x = torch.randn(2, 4)
    layer = torch.nn.Linear(4, 3)
    with runtime.Runtime(precision="bf16").autocast():
        assert layer(x).dtype == torch.bfloat16
    with runtime.Runtime(precision="fp32").autocast():
        assert layer(x).dtype == torch.float32
    mixed = runtime.Runtime(precision={"train": "fp32", "infer": "bf16"})
    with mixed.autocast("train"):
        assert layer(x).dtype == torch.float32
    with mixed.autocast("infer"):
        assert layer(x).dtype == torch.bfloat16


def test_predictor_with_folded_bn_and_channels_last_matches_the_plain_model():
    model, record, prep = build_classifier("efficientnet_lite0", "auto", 3, img_size=32)
    model.eval()
    images = torch.rand(5, 3, 40, 40).mul(255).byte().permute(0, 2, 3, 1).numpy()
    clf = Predictor(model, {"classes": ["a", "b", "c"], "preprocessing": prep.to_dict()}, precision="fp32")
    got = torch.from_numpy(clf.predict_proba(list(images)))
    batch = torch.stack([clf.transform(clf._image(x)) for x in images])
    plain, _, _ = build_classifier("efficientnet_lite0", "auto", 3, img_size=32)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = plain.eval()(batch).softmax(-1)
    assert clf._net is not clf.model  # BN was folded
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_cores_come_from_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 64)  # the host's count: not ours to use
    assert machine.machine_cores() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert machine.cores_per_process() == 1


@pytest.mark.parametrize("mode,channels_last", [("RGB", True), ("RGB", False), ("L", True)])
def test_uint8_batches_become_exactly_the_input_totensor_and_normalize_make(mode, channels_last):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).convert(mode) for _ in range(3)]
    stats = ((0.5,), (0.25,)) if mode == "L" else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    want = torch.stack([T.Normalize(*stats)(T.ToTensor()(img)) for img in images])
    rt = Runtime(torch.device("cpu"), channels_last=channels_last, normalize=stats)
    got = rt.batch(torch.stack([pixels(img) for img in images]))
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_a_run_on_uint8_batches_trains_bit_identically_to_one_on_float_batches(shapes_dir, tiny, monkeypatch):
    """The GPU's path (the workers hand over pixels, Runtime.batch normalises), taken here on the CPU."""
    common = {
        **tiny,
        "data": str(shapes_dir),
        "strategy": "full",
        "epochs": 2,
        "batch_size": 4,
        "workers": 2,
        "threads": 1,
        "crop_on": "workers",
    }  # crops made where the float run makes them
    floats = transferkit.train(name="floats", **common)
    monkeypatch.setattr(Runtime, "normalizes_on_device", property(lambda self: self.normalize is not None))
    real, dtypes = Runtime.batch, set()
    monkeypatch.setattr(Runtime, "batch", lambda self, images: dtypes.add(images.dtype) or real(self, images))
    pixel_run = transferkit.train(name="pixels", **common)
    assert dtypes == {torch.uint8}  # every batch: training, validation, test
    assert_same_weights(weights(floats.dir), weights(pixel_run.dir))
    assert pixel_run.metrics["test"]["loss"] == floats.metrics["test"]["loss"]


def test_device_crops_draw_the_crop_and_flip_that_train_transform_draws():
    prep = Preprocessing(32, (0.5,) * 3, (0.25,) * 3, "bicubic", 0.875, 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        square, row = DeviceCrop(prep)(np.asarray(image))  # the cache hands it arrays
        torch.manual_seed(seed)
        want = train_transform(prep, "basic", normalize=False)(image)
        left, top, right, bottom, flip, size = (int(v) for v in row)
        crop = F.resized_crop(image, top, left, bottom - top, right - left, [size, size], T.InterpolationMode.BICUBIC)
        assert torch.equal(pixels(F.hflip(crop) if flip else crop), want)
        assert torch.equal(square, pixels(image)) and size == 32
        flips.add(flip)
    assert flips == {0, 1}


@pytest.mark.parametrize("channels_last", [True, False])
def test_resized_crops_sample_each_crop_at_its_output_pixel_centres_then_mirror(channels_last):
    # a ramp along x (channel 0) and y (channel 1): bilinear sampling, and the average of samples where
    # the crop shrinks, give a ramp's value at each output pixel's centre exactly
    h = w = 40
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    images = torch.stack([xs, ys, xs + ys])[None].repeat(3, 1, 1, 1)
    rows = torch.tensor(
        [
            [3, 2, 20, 30, 0, 16],  # 17 x 28 -> 16 x 16: shrinks
            [5, 7, 13, 15, 1, 16],  # 8 x 8: grows, mirrored
            [1, 1, 39, 39, 1, 16],
        ],  # 38 x 38: shrinks, mirrored
        dtype=torch.float32,
    )
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    got = resized_crops(images, rows)
    assert got.shape == (3, 3, 16, 16)
    centres = (torch.arange(16, dtype=torch.float32) + 0.5) / 16
    for out, (left, top, right, bottom, flip, _) in zip(got, rows.tolist()):
        x = left - 0.5 + centres * (right - left)
        y = top - 0.5 + centres * (bottom - top)
        x = x.flip(0) if flip else x
        torch.testing.assert_close(out[0], x[None].expand(16, 16), atol=1e-4, rtol=0)
        torch.testing.assert_close(out[1], y[:, None].expand(16, 16), atol=1e-4, rtol=0)


def test_crops_are_cut_on_the_device_by_default_only_where_it_normalises_augment_basic():
    prep = Preprocessing(32, (0.5,) * 3, (0.25,) * 3, "bicubic", 0.875, 3)
    task, default = ImageTask(), TrainConfig()
    assert default.crop_on == "auto"
    assert isinstance(task.transform(prep, default, True, on_device=True, resized=True), DeviceCrop)  # CUDA
    assert not isinstance(task.transform(prep, default, True, on_device=False, resized=True), DeviceCrop)  # CPU
    for config in (TrainConfig(augment="strong"), TrainConfig(crop_on="workers"), TrainConfig(deterministic=True)):
        assert not isinstance(task.transform(prep, config, True, on_device=True, resized=True), DeviceCrop)
    asked = TrainConfig(crop_on="device")
    assert isinstance(task.transform(prep, asked, True, on_device=False, resized=True), DeviceCrop)
    for train, resized in ((False, True), (True, False)):  # evaluation; images not from the cache
        assert not isinstance(task.transform(prep, asked, train, on_device=True, resized=resized), DeviceCrop)


def test_the_demo_job_cropping_on_the_device_learns(faces_dir, tmp_path, monkeypatch):
    real, seen = Runtime.batch, []
    monkeypatch.setattr(Runtime, "batch", lambda self, images: seen.append(type(images)) or real(self, images))
    run = transferkit.train(
        data=str(faces_dir),
        crop_on="device",
        img_size=96,
        runs_dir=str(tmp_path / "runs"),
        quiet=True,
        html_report=False,
        workers=2,
    )
    assert list in seen and torch.Tensor in seen  # training batches: squares and crop rows; val/test: images
    assert run.metrics["test"]["n"] == 80 and run.metrics["test"]["accuracy"] >= 0.95  # as the demo job
    with pytest.raises(UserError, match="crop_on 'device' crops the decoded-image cache.*augment 'strong'"):
        TrainConfig(crop_on="device", augment="strong")
