"""Inference from a bundle: `transferkit.load(path).predict([...])`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transferkit.core.checks import check_precision
from transferkit.core.errors import UserError
from transferkit.core.machine import pick_device
from transferkit.data.check import inspect_file
from transferkit.data.images import from_array, is_image_file, open_image, to_mode
from transferkit.data.preprocessing import Preprocessing, preprocessing_from_dict
from transferkit.data.transforms import eval_transform
from transferkit.deploy.bundle import load_bundle, weights_digest
from transferkit.deploy.runners import BACKENDS
from transferkit.models.fuse import fold_batchnorm
from transferkit.models.precision import Workload
from transferkit.models.runtime import inference_runtime

TTA = ("none", "flip", "flip-crop")


def expand_inputs(inputs) -> list:
    """Files stay, folders become their image files (sorted, recursive); PIL images and arrays pass."""
    out = []
    for item in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
        if isinstance(item, (str, Path)):
            path = Path(item)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
                if not found:
                    raise UserError(f"Folder '{path}' holds no image files.")
                out += [str(p) for p in found]
            elif path.is_file():
                out.append(str(path))
            else:
                raise UserError(f"Input '{path}' does not exist.")
        else:
            out.append(item)
    return out


class Predictor:
    """A loaded classifier with its classes and preprocessing. It runs channels_last, with BatchNorm folded
    into the convolutions (`fuse`), in fp32 or bf16: `precision` auto picks bf16 only where it measured
    faster on this machine for this model (see `precision`); fp32 is what an export is checked against."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: str = "cpu", precision: str = "auto"):
        prep = preprocessing_from_dict(meta["preprocessing"])
        arch = meta.get("architecture", {})
        workload = Workload.of(model, arch.get("model", arch.get("arch", "model")), prep, 32)
        self.runtime = inference_runtime(precision, torch.device(device), workload, meta.get("precision"))
        self.precision = self.runtime.precision["infer"]
        self.model = self.runtime.prepare(model).eval()
        self._net = None  # the folded copy, made on the first batch
        self.device = device
        self._set_meta(meta)

    def _set_meta(self, meta: dict) -> None:
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.transform = eval_transform(self.preprocessing)
        # flip-crop's second view: the whole short side (crop_pct 1) instead of the central crop_pct
        self.wide_transform = eval_transform(replace(self.preprocessing, crop_pct=1.0))

    def _image(self, item) -> Image.Image:
        chans = self.preprocessing.in_chans
        if isinstance(item, Image.Image):
            return to_mode(item, chans)
        if isinstance(item, np.ndarray):
            return from_array(item, chans)
        return open_image(item, chans, self.preprocessing.resize)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        batch = self.runtime.batch(batch)
        if self._net is None:
            self._net = fold_batchnorm(self.model, batch[:2])
        with self.runtime.autocast("infer"):
            return self._net(batch).float()

    def _batches(self, inputs, batch_size: int, transforms: list):
        """For each batch of inputs, one stacked tensor per transform (each image decoded once)."""
        items = expand_inputs(inputs)
        for start in range(0, len(items), batch_size):
            images = [self._image(x) for x in items[start : start + batch_size]]
            yield [torch.stack([t(image) for image in images]) for t in transforms]

    @torch.inference_mode()
    def predict_logits(self, inputs, batch_size: int = 32) -> np.ndarray:
        """Raw logits, shape (n_inputs, n_classes) (calibration and export checks use them)."""
        out = [self._logits(views[0]).cpu() for views in self._batches(inputs, batch_size, [self.transform])]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    @torch.inference_mode()
    def predict_proba(self, inputs, batch_size: int = 32, tta: str = "none") -> np.ndarray:
        """Class probabilities, shape (n_inputs, n_classes). `tta` flip: the mean over the image and its
        mirror; flip-crop: also over the whole short side (crop_pct 1) and its mirror."""
        if tta not in TTA:
            raise UserError(f"tta must be one of {', '.join(TTA)}; got '{tta}'.")
        transforms = [self.transform] + ([self.wide_transform] if tta == "flip-crop" else [])
        out = []
        for views in self._batches(inputs, batch_size, transforms):
            probs = [self._logits(v).softmax(-1) for v in views]
            if tta != "none":
                probs += [self._logits(torch.flip(v, dims=[3])).softmax(-1) for v in views]
            out.append(torch.stack(probs).mean(0).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, inputs, top_k: int = 5, batch_size: int = 32, tta: str = "none", skipped=None) -> list[dict]:
        """Top-k predictions per input: {'input', 'label', 'score', 'top_k': [{'label', 'score'}]}. With a list
        `skipped`, a file that cannot be read is left out and recorded there as (name, reason) instead of
        stopping the batch; when none can be read, a UserError says so."""
        return self.predict_named(self.named_inputs(inputs), top_k, batch_size, tta, skipped)

    def predict_named(self, named: list, top_k: int = 5, batch_size: int = 32, tta: str = "none", skipped=None):
        """`predict` over (name, input) pairs: each result's 'input' is its name."""
        k = min(top_k, len(self.classes))
        results = []
        for start in range(0, len(named), batch_size):
            chunk = named[start : start + batch_size]
            if skipped is not None:
                chunk = self._readable(chunk, skipped)
            probs = self.predict_proba([item for _, item in chunk], batch_size, tta)
            for (name, _), p in zip(chunk, probs):
                order = np.argsort(-p)[:k]
                top = [{"label": self.classes[i], "score": float(p[i])} for i in order]
                results.append({"input": name, "label": top[0]["label"], "score": top[0]["score"], "top_k": top})
        if named and not results:
            first, reason = skipped[0]
            if len(named) == 1:
                raise UserError(f"Cannot read image '{first}': {reason}. Give an image file that opens.")
            raise UserError(
                f"None of the {len(named)} inputs can be read as an image, e.g. {first}: {reason}. "
                "Give image files (.jpg, .png, ...) that open."
            )
        return results

    def _readable(self, named: list, skipped: list) -> list:
        """The (name, image) pairs of `named` whose files decode; the others go to `skipped` with the reason
        `train`'s scan gives (see `check.inspect_file`)."""
        out = []
        for name, item in named:
            try:
                out.append((name, self._image(item)))
            except UserError as err:
                reason = inspect_file(item) if isinstance(item, (str, Path)) else None
                skipped.append((name, reason or str(err)))
        return out

    def named_inputs(self, inputs) -> list[tuple[str, object]]:
        """(name, input) of each input after expanding folders."""
        return [(x if isinstance(x, str) else f"<{type(x).__name__}>", x) for x in expand_inputs(inputs)]


class TextPredictor(Predictor):
    """The same interface for a text model: inputs are strings, .txt files (one text each) or tables
    (.csv/.tsv/.jsonl: the text column of every row, see `expand_texts`)."""

    def _set_meta(self, meta: dict) -> None:
        from transferkit.data.texts import TokenIds

        self.meta, self.classes = meta, meta["classes"]
        self.preprocessing = preprocessing_from_dict(meta["preprocessing"])
        self.transform = TokenIds(
            self.preprocessing.tokenizer, self.preprocessing.max_length, self.preprocessing.pad_id
        )

    def _batches(self, inputs, batch_size: int, transforms: list):
        texts = [text for _, text in expand_texts(inputs)]
        for start in range(0, len(texts), batch_size):
            yield [self.transform.batch(texts[start : start + batch_size])]

    def predict_proba(self, inputs, batch_size: int = 32, tta: str = "none") -> np.ndarray:
        if tta != "none":
            raise UserError(f"tta '{tta}' flips and crops images; a text model takes tta none.")
        return super().predict_proba(inputs, batch_size)

    def named_inputs(self, inputs) -> list[tuple[str, str]]:
        return expand_texts(inputs)

    def _readable(self, named: list, skipped: list) -> list:
        return named  # texts: read whole by `expand_texts`, nothing left to fail


def expand_texts(inputs, text_column: str = "text") -> list[tuple[str, str]]:
    """(name, text) pairs: a .txt file is one text, a .csv/.tsv/.jsonl table one per row of its
    `text_column`, any other string the text itself (named by its first 60 characters)."""
    from transferkit.data.texts import TABLES, read_texts

    out = []
    for item in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
        path = Path(item) if isinstance(item, (str, Path)) and len(str(item)) < 4096 else None
        if path is not None and path.suffix.lower() in TABLES + (".txt",) and path.is_file():
            out += read_texts(path, text_column)
        elif isinstance(item, str):
            out.append((item[:60] + ("..." if len(item) > 60 else ""), item))
        else:
            raise UserError(
                f"A text model predicts strings, .txt files and .csv/.tsv/.jsonl tables; got {type(item).__name__}."
            )
    return out


def sample_batches(data, samples: list, prep: Preprocessing, size: int = 64):
    """The images of (ref, label) samples of a Data, decoded `size` at a time (memory stays flat)."""
    for start in range(0, len(samples), size):
        yield [data.read(ref, prep.in_chans, prep.resize) for ref, _ in samples[start : start + size]]


class ExportedPredictor(Predictor):
    """The same interface over an exported model (`transferkit export`): ONNX through onnxruntime, TFLite through
    the LiteRT interpreter, a SavedModel through TensorFlow in a child process. Preprocessing, TTA and top-k as in
    Predictor, no PyTorch model involved."""

    def __init__(self, path: Path, backend: str):
        record = json.loads(path.with_name("model.json").read_text())
        if "exports" in record and path.name not in record["exports"]:
            raise UserError(
                f"{path.with_name('model.json')} has no record of '{path.name}' (an export of another "
                f"model replaced it): export the run again into that folder with transferkit export."
            )
        own = record.get("exports", {}).get(path.name, record if record.get("file") == path.name else {})
        if own.get("with_preprocessing"):
            raise UserError(
                f"'{path}' was exported --with-preprocessing (it takes uint8 images); --backend {backend} "
                f"needs a plain export: transferkit export RUN --format {own['format']}."
            )
        _check_export(path, own, BACKENDS[backend][2])
        self._set_meta(record)
        self.run = BACKENDS[backend][1](path)
        self.device, self.precision = "cpu", {"tflite-fp16": "fp16", "tflite-int8": "int8"}.get(backend, "fp32")

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(batch.numpy()))


class ExportedTextPredictor(ExportedPredictor, TextPredictor):
    """A text model's ONNX export: the tokenizer from its model.json, the ids to onnxruntime."""


def _check_export(path: Path, own: dict, flags: str) -> None:
    """Refuse an export whose parity check failed, or that was made from other weights than its run's best/ now
    holds (the run was resumed and trained further): either would predict other than the model."""
    if own.get("parity", {}).get("passed") is False:
        raise UserError(
            f"'{path}' failed its parity check against the PyTorch model when it was exported "
            f"(see {path.with_name('model.json')}); do not deploy it."
        )
    source = own.get("source")
    bundle = path.parent / source["bundle"] if source else None
    if bundle is not None and (bundle / "model.safetensors").is_file() and weights_digest(bundle) != source["sha256"]:
        raise UserError(
            f"'{path}' was exported from other weights than '{bundle.resolve()}' holds now (the run was "
            f"trained further): export it again with `transferkit export RUN {flags}`."
        )


PREDICTORS = {"image": (Predictor, ExportedPredictor), "text": (TextPredictor, ExportedTextPredictor)}
"""By a bundle's `architecture.task`: the predictor of its PyTorch model, and of its exports."""


def load(path: str | Path, device: str = "cpu", backend: str = "torch", precision: str = "auto") -> Predictor:
    """Load a bundle (or a run directory's best/) for prediction; another backend (see runners.BACKENDS: onnx,
    tflite, tflite-fp16, tflite-int8, saved_model) loads the run's export of that kind instead (a run, its export
    folder or the file), whatever `precision`."""
    check_precision(precision)
    device = str(pick_device(device))
    if backend in BACKENDS:
        path, file = Path(path), BACKENDS[backend][0]
        found = next(
            (
                p
                for p in (path, path / file, path / "export" / file, path.parent / "export" / file)
                if p.exists() and p.name == file
            ),
            None,
        )
        if found is None or not found.with_name("model.json").is_file():
            raise UserError(
                f"No {file} with its model.json at '{path}': run `transferkit export {path} "
                f"{BACKENDS[backend][2]}` first."
            )
        task = json.loads(found.with_name("model.json").read_text()).get("architecture", {}).get("task", "image")
        return PREDICTORS[task][1](found, backend)
    if backend != "torch":
        raise UserError(f"backend must be torch, {', '.join(BACKENDS)}; got '{backend}'.")
    model, meta = load_bundle(path)
    return PREDICTORS[meta["architecture"].get("task", "image")][0](model, meta, device, precision)
