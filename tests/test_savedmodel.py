"""TensorFlow SavedModel export (onnx2tf; TensorFlow in a child process): parity with PyTorch on any batch,
predict through it, preprocessing inside the graph, and clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder, needs
from PIL import Image

import transferkit
from transferkit.deploy.export import export
from transferkit.deploy.savedmodel import saved_model_runner

pytestmark = needs("tensorflow", "tf_keras", "onnx2tf")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("savedmodel")
    data = make_folder(root / "shapes", per_class=10)
    return transferkit.train(
        data=str(data),
        strategy="linear-probe",
        img_size=32,
        epochs=1,
        batch_size=8,
        runs_dir=str(root / "runs"),
        quiet=True,
        workers=0,
        html_report=False,
    )


def _images(run) -> list[str]:
    return sorted(str(p) for p in Path(run.dir).parent.parent.joinpath("shapes").rglob("*.png"))


def test_saved_model_agrees_with_pytorch_on_any_batch_and_predict_runs_it(run):
    result = export(run.dir, "saved_model")
    folder = Path(result["path"])
    assert folder.name == "saved_model"
    assert (folder / "saved_model.pb").is_file()
    assert not list(folder.glob("*.tflite"))
    assert result["max_abs_logit_diff"] <= 1e-3
    assert result["top1_agreement"] == 1.0
    record = json.loads((run.dir / "export" / "model.json").read_text())
    assert record["format"] == "saved_model"
    assert record["input"]["shape"] == ["batch", 32, 32, 3]  # NHWC
    files = _images(run)
    served, torch_clf = transferkit.load(run.dir, backend="saved_model"), transferkit.load(run.dir, precision="fp32")
    want = torch_clf.predict_proba(files)
    got = served.predict_proba(files)  # one batch of 20
    assert len(files) == 20
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() < 1e-3
    one = np.concatenate([served.predict_proba([file]) for file in files[:3]])  # a batch of one image each
    assert np.abs(one - want[:3]).max() < 1e-3  # no row depends on another (onnx2tf once averaged over the batch)
    flip = served.predict_proba(files[:4], tta="flip")
    assert np.abs(flip - torch_clf.predict_proba(files[:4], tta="flip")).max() < 1e-3


def test_saved_model_with_preprocessing_takes_raw_images_of_any_size(run, tmp_path):
    from scipy.special import softmax

    result = export(run.dir, "saved_model", with_preprocessing=True)
    assert result["top1_agreement"] == 1.0
    assert result["max_abs_logit_diff"] <= 5e-2
    files = []
    for i, path in enumerate(_images(run)[:3]):  # other sizes than the 40x40 training images
        out = tmp_path / f"odd{i}.png"
        Image.open(path).resize([(57, 91), (120, 64), (33, 33)][i], Image.BICUBIC).save(out)
        files.append(str(out))
    served = saved_model_runner(Path(result["path"]))
    got = np.concatenate([served(np.asarray(Image.open(f).convert("RGB"))[None]) for f in files])
    want = transferkit.load(run.dir, precision="fp32").predict_proba(files)
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(softmax(got, axis=1), want, atol=1e-2)
    with pytest.raises(transferkit.UserError, match="with-preprocessing"):
        transferkit.load(run.dir, backend="saved_model")


def test_saved_model_mistakes_are_named(run, tmp_path, monkeypatch):
    with pytest.raises(transferkit.UserError, match="transferkit export .* --format saved_model"):
        transferkit.load(tmp_path, backend="saved_model")
    with pytest.raises(transferkit.UserError, match="--with-preprocessing is available for --format onnx and"):
        export(run.dir, "torchscript", with_preprocessing=True)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx2tf" else real(name, *a))
    with pytest.raises(transferkit.UserError, match=r"needs onnx2tf: pip install 'transferkit\[savedmodel\]'"):
        export(run.dir, "saved_model")
