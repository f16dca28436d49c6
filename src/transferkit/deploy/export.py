"""Export a run's best model to ONNX, TorchScript, TFLite or a TensorFlow SavedModel, then check the export against
PyTorch.

`transferkit export runs/NAME --format onnx|torchscript|tflite|saved_model` writes runs/NAME/export/model.onnx (or
model.pt, model.tflite, the folder saved_model/; model_fp16/model_int8.tflite with --fp16/--int8) with model.json
beside it (classes, preprocessing, input and output names). ONNX, TorchScript and the SavedModel (NHWC) take a
dynamic batch, TFLite one image. A text model (ONNX only) takes token ids, (batch, tokens) both dynamic, with 0
after each text's end; its tokenizer.json is written beside it (the tokenizers library reads it). After writing,
the exported file is run (onnxruntime, torch.jit.load, the LiteRT interpreter, TensorFlow in a child process) on
validation images next to the PyTorch model: the largest |logit difference| and the top-1 agreement are printed
and stored in model.json; a difference above the tolerance or any top-1 disagreement is an error. An int8 model
is judged by its test-split accuracy against the PyTorch model's instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from transferkit.core.errors import UserError
from transferkit.core.files import atomic_write, write_text
from transferkit.data.preprocessing import Preprocessing, TextPreprocessing, preprocessing_from_dict
from transferkit.data.transforms import eval_transform
from transferkit.deploy.bundle import bundle_dir, load_bundle, weights_digest
from transferkit.deploy.runners import onnx_runner, torchscript_runner
from transferkit.deploy.savedmodel import saved_model_runner
from transferkit.deploy.tflite import QUANTIZE, tflite_runner, write_tflite

PARITY_IMAGES = 32
CALIBRATION_IMAGES = 100


@dataclass(frozen=True)
class Job:
    """What a format's writer gets: the model, its input, the run's preprocessing, and the options."""

    model: torch.nn.Module
    given: ModelInput
    prep: Preprocessing | TextPreprocessing
    run_dir: Path
    opset: int = 18
    with_preprocessing: bool = False
    quantize: str = "none"
    calibration: int = CALIBRATION_IMAGES


def export(
    run_dir: str | Path,
    format: str = "onnx",
    out: str | Path | None = None,
    tolerance: float | None = None,
    opset: int = 18,
    with_preprocessing: bool = False,
    quantize: str = "none",
    calibration: int = CALIBRATION_IMAGES,
) -> dict:
    """Write the export and its model.json; returns the parity record. Raises UserError on a failed check.

    `with_preprocessing` (ONNX, SavedModel): the graph takes uint8 (batch, H, W, C) images and resizes, crops and
    normalizes them itself (see `preprocessing_graph`); the check then compares it with `predict` on the
    same decoded images. `quantize` (TFLite): fp16 weights, or int8 calibrated on `calibration` train images.
    Default tolerance: 1e-4 on logits; 1e-3 for TFLite and SavedModel (XNNPACK's and TensorFlow's kernels sum in
    another order; measured: README, Report, TensorBoard, TTA, export); 0.05 with preprocessing (ONNX's or
    TensorFlow's antialiased cubic resize and PIL's differ by up to a gray level); fp16 and int8 are judged by
    what they cost: the test-split accuracy may drop by 0.02 at most."""
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got '{format}'.")
    if with_preprocessing and format not in ("onnx", "saved_model"):
        raise UserError("--with-preprocessing is available for --format onnx and saved_model.")
    if quantize not in QUANTIZE or (quantize != "none" and format != "tflite"):
        raise UserError(f"--fp16 and --int8 are for --format tflite; got quantize '{quantize}' with '{format}'.")
    if tolerance is None:
        tolerance = _default_tolerance(format, with_preprocessing, quantize)
    run_dir = Path(run_dir)
    model, meta = load_bundle(run_dir)
    model.eval()
    prep = preprocessing_from_dict(meta["preprocessing"])
    given = INPUTS[prep.kind](run_dir, prep, format, with_preprocessing)
    if not out:
        home = run_dir if (run_dir / "config.yaml").is_file() else run_dir.parent
        out = home / "export"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name, write, runner = FORMATS[format]
    path = out / (name if quantize == "none" else name.replace(".", f"_{quantize}."))  # model_int8.tflite
    job = Job(model, given, prep, run_dir, opset, with_preprocessing, quantize, calibration)
    atomic_write(path, lambda tmp: write(job, tmp))  # a fault (a full disk) leaves the previous export
    run = runner(path)
    for file, text in given.files.items():
        write_text(out / file, text)
    if with_preprocessing:  # raw decoded images, one at a time (sizes differ), against `predict` on them
        from transferkit.deploy.predictor import Predictor

        images = parity_images(run_dir, prep)
        want = Predictor(model, meta, precision="fp32").predict_logits(images)
        got = np.concatenate([run(np.asarray(image)[None]) for image in images])
    else:
        batch = given.parity
        with torch.no_grad():
            want = model(batch).numpy()
        got = np.concatenate([run(batch[i : i + 8].numpy()) for i in range(0, len(batch), 8)])
    parity = {
        "images": len(got),
        "max_abs_logit_diff": float(np.abs(got - want).max()),
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "tolerance": tolerance,
        "against": "transferkit predict in fp32 on the same images"
        if with_preprocessing
        else "the PyTorch model in fp32",
        "precision": {"none": "fp32"}.get(quantize, quantize),
    }
    if quantize != "none":  # judged by what it costs: accuracy on the test split, against the PyTorch model's
        parity["test_accuracy"] = split_accuracy(run_dir, model, prep, meta["classes"], run)
        parity["passed"] = parity["test_accuracy"]["change"] >= -tolerance
    else:
        parity["passed"] = parity["max_abs_logit_diff"] <= tolerance and parity["top1_agreement"] == 1.0
    source = bundle_dir(run_dir)  # which weights: predict refuses this export once the run's best/ has moved on
    try:  # relative, so a run folder copied elsewhere still finds its best/
        bundle = os.path.relpath(source, out)
    except ValueError:  # another drive (Windows)
        bundle = str(source.resolve())
    record = {
        "format": format,
        "file": path.name,
        "classes": meta["classes"],
        "preprocessing": prep.to_dict(),
        "with_preprocessing": with_preprocessing,
        "input": given.record,
        "files": sorted(given.files),
        "output": {"name": "logits", "shape": ["batch", len(meta["classes"])]},
        "opset": opset if format == "onnx" else None,
        "parity": parity,
        "source": {"bundle": bundle, "sha256": weights_digest(source)},
        "architecture": meta["architecture"],
    }
    _write_record(out, record)
    _check(parity, format, path)
    return {"path": str(path), **parity}


def _default_tolerance(format: str, with_preprocessing: bool, quantize: str) -> float:
    """The parity check's tolerance when none is given (see `export`)."""
    if quantize != "none":
        return 0.02
    if with_preprocessing:
        return 5e-2
    if format in ("tflite", "saved_model"):
        return 1e-3
    return 1e-4


def _check(parity: dict, format: str, path: Path) -> None:
    """A failed parity check is an error that says by how much."""
    tolerance, accuracy = parity["tolerance"], parity.get("test_accuracy")
    if accuracy is not None:
        if not parity["passed"]:
            raise UserError(
                f"The {parity['precision']} {format} export at '{path}' loses {-accuracy['change']:.3f} "
                f"test accuracy ({accuracy['pytorch']:.3f} -> {accuracy['export']:.3f} on "
                f"{accuracy['images']} images; tolerance {tolerance:g}). Calibrate on more images "
                "(--calibration) or ship fp32/fp16."
            )
        return
    if not parity["passed"]:
        raise UserError(
            f"The {format} export at '{path}' disagrees with {parity['against']} on {parity['images']} "
            f"images: max |logit diff| {parity['max_abs_logit_diff']:.2e} (tolerance {tolerance:g}), top-1 "
            f"agreement {parity['top1_agreement']:.3f}. Do not deploy it; report this with the model name."
        )


def split_accuracy(run_dir: Path, model: torch.nn.Module, prep: Preprocessing, classes: list[str], run) -> dict:
    """Top-1 accuracy of the PyTorch model (fp32) and of the export on the run's test split."""
    from transferkit.deploy.predictor import sample_batches

    data, samples = _split_samples(run_dir, ("test",), None)
    if not samples:
        return {"images": 0, "pytorch": float("nan"), "export": float("nan"), "change": 0.0}
    transform, right, start = eval_transform(prep), np.zeros(2), 0
    for images in sample_batches(data, samples, prep):
        batch = torch.stack([transform(image) for image in images])
        labels = np.array([classes.index(label) for _, label in samples[start : start + len(images)]])
        start += len(images)
        with torch.no_grad():
            right[0] += (model(batch).numpy().argmax(1) == labels).sum()
        right[1] += (run(batch.numpy()).argmax(1) == labels).sum()
    pytorch, exported = right / len(samples)
    return {
        "images": len(samples),
        "pytorch": float(pytorch),
        "export": float(exported),
        "change": float(exported - pytorch),
    }


def _onnx(job: Job, path: Path):
    _require("onnx", "onnxscript", "onnxruntime")
    given = job.given
    dims = {axis: torch.export.Dim(name, min=low, max=high) for axis, (name, low, high) in given.dims.items()}
    torch.onnx.export(
        job.model,
        (given.example,),
        str(path),
        input_names=[given.name],
        output_names=["logits"],
        dynamic_shapes={"x": dims},
        opset_version=job.opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    if job.with_preprocessing:
        import onnx
        from onnx.compose import merge_models

        net = onnx.load(str(path))
        pre = preprocessing_graph(job.prep, job.opset, net.ir_version)
        onnx.save(merge_models(pre, net, io_map=[("pre_pixels", "pixels")]), str(path))


def _torchscript(job: Job, path: Path):
    with torch.no_grad():
        scripted = torch.jit.trace(job.model, job.given.example)
    scripted.save(str(path))


def _saved_model(job: Job, folder: Path):
    if job.prep.kind != "image":
        raise UserError("SavedModel export is for image models; export a text model with --format onnx.")
    import tempfile

    from transferkit.deploy.savedmodel import require, write_saved_model

    require()
    prep = job.prep
    steps = {"resize": prep.resize, "img_size": prep.img_size, "mean": list(prep.mean), "std": list(prep.std)}
    plain = replace(job, with_preprocessing=False, given=replace(job.given, name="images"))  # TensorFlow adds it
    with tempfile.TemporaryDirectory() as tmp:
        _onnx(plain, Path(tmp) / "model.onnx")
        write_saved_model(Path(tmp) / "model.onnx", folder, steps if job.with_preprocessing else None)


def _tflite(job: Job, path: Path):
    if job.prep.kind != "image":
        raise UserError("TFLite export is for image models; export a text model with --format onnx.")
    calibration = None
    if job.quantize == "int8":
        data, samples = _split_samples(job.run_dir, ("train", "val"), job.calibration, draw=True)
        if not samples:
            raise UserError(
                f"--int8 calibrates on the run's train images, and '{job.run_dir}' is a bundle without "
                "its run: export from the run directory (the one with split.json)."
            )
        calibration = _preprocessed(data, samples, job.prep)
    write_tflite(job.model, job.given.example, path, job.quantize, calibration)


SHARED = ("classes", "preprocessing", "architecture")
"""What every export of one model has in common; the rest of a record is the export's own."""


def _write_record(out: Path, record: dict) -> None:
    """model.json: the latest export's record, and under "exports" each export in the folder by its file name,
    so that model.onnx exported --with-preprocessing and a model.tflite beside it keep their own input, options
    and parity (exports of another model, or whose files are gone, are dropped)."""
    try:
        before = json.loads((out / "model.json").read_text())
    except (OSError, ValueError):  # the first export here, or a damaged record
        before = {}
    before = before if isinstance(before, dict) else {}
    record = json.loads(json.dumps(record))  # tuples as lists, as read back
    # a record written before "exports" existed describes its own file only
    earlier = before.get("exports", {before["file"]: before} if "file" in before else {})
    kept = earlier if all(before.get(k) == record[k] for k in SHARED) else {}
    exports = {
        file: {k: v for k, v in own.items() if k not in SHARED} for file, own in kept.items() if (out / file).exists()
    }
    exports[record["file"]] = {k: v for k, v in record.items() if k not in SHARED}
    write_text(out / "model.json", json.dumps({**record, "exports": exports}, indent=1))


FORMATS = {
    "onnx": ("model.onnx", _onnx, onnx_runner),
    "torchscript": ("model.pt", _torchscript, torchscript_runner),
    "tflite": ("model.tflite", _tflite, tflite_runner),
    "saved_model": ("saved_model", _saved_model, saved_model_runner),
}
"""Each format: its file name, its writer (job, path) and its runner (path -> numpy in, logits out)."""


@dataclass
class ModelInput:
    """What an export takes: its input's name, an example for tracing, the dynamic axes
    ({axis: (name, min, max)}), the batch the parity check runs, the record for model.json, and files
    written beside the export."""

    name: str
    example: torch.Tensor
    dims: dict
    parity: torch.Tensor
    record: dict
    files: dict[str, str] = field(default_factory=dict)


def image_input(run_dir: Path, prep: Preprocessing, format: str, with_preprocessing: bool) -> ModelInput:
    c, s = prep.in_chans, prep.img_size
    if with_preprocessing:
        record = {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", "height", "width", c],
            "note": "decoded images, all of one call the same size; resize, crop and normalization inside",
        }
    else:
        record = {
            "name": "images",
            "dtype": "float32",
            "shape": ["batch", s, s, c] if format == "saved_model" else ["batch", c, s, s],
            "note": "RGB scaled to 0..1, resized so the short side is preprocessing.img_size / crop_pct, "
            "center-cropped, then normalized with mean and std",
        }
    return ModelInput(
        "pixels" if with_preprocessing else "images",
        torch.randn(2, c, s, s),
        {0: ("batch", 1, 4096)},
        parity_batch(run_dir, prep),
        record,
    )


def text_input(run_dir: Path, prep: TextPreprocessing, format: str, with_preprocessing: bool) -> ModelInput:
    from transferkit.data.texts import TokenIds

    if with_preprocessing or format != "onnx":
        raise UserError(
            "A text model exports to ONNX without --with-preprocessing: it takes token ids, and "
            "its tokenizer.json is written beside it."
        )
    tokens = TokenIds(prep.tokenizer, prep.max_length, prep.pad_id)
    data, samples = _parity_samples(run_dir)
    texts = [data.read(ref) for ref, _ in samples] or ["A text to check the export with.", "And a second one."]
    record = {
        "name": "input_ids",
        "dtype": "int64",
        "shape": ["batch", "tokens"],
        "note": f"tokenizer.json's ids, at most {prep.max_length} per text, padded with {prep.pad_id} "
        "(the padding is what the model masks)",
    }
    return ModelInput(
        "input_ids",
        tokens.batch(texts[:2]),
        {0: ("batch", 1, 4096), 1: ("tokens", 2, 512)},
        tokens.batch(texts),
        record,
        {"tokenizer.json": prep.tokenizer},
    )


INPUTS = {"image": image_input, "text": text_input}


def preprocessing_graph(prep: Preprocessing, opset: int, ir_version: int):
    """ONNX graph: uint8 images (batch, H, W, C) -> "pre_pixels" (batch, C, S, S), as `eval_transform`:
    the short side resized to img_size / crop_pct and the long one to int(resize * long / short)
    (antialiased cubic, a = -0.5, half-pixel centres, as PIL), rounded and clipped to 0..255 as PIL's
    uint8 output, the center S x S taken with offsets round((size - S) / 2) half to even (torchvision),
    then scaled and normalized."""
    from onnx import TensorProto, helper, numpy_helper

    resize, size = prep.resize, prep.img_size
    consts = {
        "R": np.array(resize, np.int64),
        "S": np.array(size, np.int64),
        "two": np.array(2, np.int64),
        "one": np.array([1], np.int64),
        "three": np.array([3], np.int64),
        "lo": np.array(0, np.float32),
        "hi": np.array(255, np.float32),
        "axes": np.array([1, 2], np.int64),
        "mean": (np.array(prep.mean, np.float32) * 255).reshape(1, 1, 1, -1),
        "std": (np.array(prep.std, np.float32) * 255).reshape(1, 1, 1, -1),
    }
    n = helper.make_node
    nodes = [
        n("Shape", ["images"], ["pre_shape"]),
        n("Slice", ["pre_shape", "pre_one", "pre_three"], ["pre_hw"]),  # [H, W]
        n("ReduceMin", ["pre_hw"], ["pre_short"], keepdims=0),
        n("Mul", ["pre_hw", "pre_R"], ["pre_hwR"]),
        n("Div", ["pre_hwR", "pre_short"], ["pre_sizes"]),  # integer division: int(resize * side / short)
        n("Cast", ["images"], ["pre_f"], to=TensorProto.FLOAT),
        n(
            "Resize",
            ["pre_f", "", "", "pre_sizes"],
            ["pre_r"],
            mode="cubic",
            antialias=1,
            axes=[1, 2],
            cubic_coeff_a=-0.5,
            coordinate_transformation_mode="half_pixel",
        ),
        n("Clip", ["pre_r", "pre_lo", "pre_hi"], ["pre_c"]),
        n("Round", ["pre_c"], ["pre_q"]),
        n("Sub", ["pre_sizes", "pre_S"], ["pre_d"]),  # offsets: k + (d % 2) * (k % 2), k = d // 2
        n("Div", ["pre_d", "pre_two"], ["pre_k"]),
        n("Mod", ["pre_d", "pre_two"], ["pre_dodd"]),
        n("Mod", ["pre_k", "pre_two"], ["pre_kodd"]),
        n("Mul", ["pre_dodd", "pre_kodd"], ["pre_bump"]),
        n("Add", ["pre_k", "pre_bump"], ["pre_start"]),
        n("Add", ["pre_start", "pre_S"], ["pre_end"]),
        n("Slice", ["pre_q", "pre_start", "pre_end", "pre_axes"], ["pre_crop"]),
        n("Sub", ["pre_crop", "pre_mean"], ["pre_m"]),
        n("Div", ["pre_m", "pre_std"], ["pre_n"]),
        n("Transpose", ["pre_n"], ["pre_pixels"], perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "preprocessing",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", "height", "width", prep.in_chans])],
        [helper.make_tensor_value_info("pre_pixels", TensorProto.FLOAT, ["batch", prep.in_chans, size, size])],
        [numpy_helper.from_array(v, f"pre_{k}") for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _split_samples(run_dir: Path, splits: tuple[str, ...], limit: int | None, draw: bool = False):
    """(data, up to `limit` samples of the first of `splits` the run has); (None, []) for a bare bundle. `draw`: the
    `limit` samples drawn over the whole split with a fixed seed (calibration: a re-export is the same file), not
    the first ones."""
    run = next((p for p in (run_dir, run_dir.parent) if (p / "split.json").is_file()), None)
    if run is None:
        return None, []
    from transferkit.core.config import TrainConfig
    from transferkit.data.sources import config_data

    data = config_data(TrainConfig.load(run / "config.yaml"), run / "split.json")
    samples = next((data.splits[s] for s in splits if data.splits.get(s)), [])
    if draw and limit is not None and len(samples) > limit:
        picked = np.random.default_rng(0).choice(len(samples), limit, replace=False)
        samples = [samples[i] for i in sorted(picked)]
    return data, samples[:limit]


def _parity_samples(run_dir: Path):
    """(data, up to 32 samples): the run's validation split, else test, else train; (None, []) for a bare bundle."""
    return _split_samples(run_dir, ("val", "test", "train"), PARITY_IMAGES)


def parity_batch(run_dir: Path, prep: Preprocessing) -> torch.Tensor:
    """Up to 32 validation images of the run, preprocessed; random tensors for a bare bundle."""
    data, samples = _parity_samples(run_dir)
    if samples:
        return _preprocessed(data, samples, prep)
    return torch.randn(
        PARITY_IMAGES, prep.in_chans, prep.img_size, prep.img_size, generator=torch.Generator().manual_seed(0)
    )


def _preprocessed(data, samples: list, prep: Preprocessing) -> torch.Tensor:
    """The images of (ref, label) samples, decoded and preprocessed as `predict` does, in one batch."""
    transform = eval_transform(prep)
    return torch.stack([transform(data.read(ref, prep.in_chans, prep.resize)) for ref, _ in samples])


def parity_images(run_dir: Path, prep: Preprocessing) -> list:
    """Up to 32 validation images of the run, decoded at full size; random images for a bare bundle."""
    from PIL import Image

    data, samples = _parity_samples(run_dir)
    if samples:
        return [data.read(ref, prep.in_chans) for ref, _ in samples]
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (prep.resize + 17, prep.resize + 5, 3), dtype=np.uint8)) for _ in range(4)
    ]


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"ONNX export needs {', '.join(missing)}: pip install 'transferkit[export]' "
            "(onnx, onnxscript, onnxruntime)."
        )
