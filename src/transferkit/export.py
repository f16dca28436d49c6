"""Export a run's best model to ONNX or TorchScript, then check the export against PyTorch.

`transferkit export runs/NAME --format onnx|torchscript` writes runs/NAME/export/model.onnx (or
model.pt) with model.json beside it (classes, preprocessing, input and output names). The
batch dimension is dynamic. After writing, the exported file is run (onnxruntime for ONNX,
torch.jit.load for TorchScript) on validation images next to the PyTorch model: the largest
|logit difference| and the top-1 agreement are printed and stored in model.json; a difference
above the tolerance or any top-1 disagreement is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from transferkit.bundle import load_bundle
from transferkit.errors import UserError
from transferkit.model import Preprocessing
from transferkit.transforms import eval_transform

FORMATS = ("onnx", "torchscript")
PARITY_IMAGES = 32


def export(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None, tolerance: float = 1e-4,
           opset: int = 18) -> dict:
    """Write the export and its model.json; returns the parity record. Raises UserError on a failed check."""
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got '{format}'.")
    run_dir = Path(run_dir)
    model, meta = load_bundle(run_dir)
    model.eval()
    prep = Preprocessing.from_dict(meta["preprocessing"])
    out = Path(out) if out else (run_dir if (run_dir / "config.yaml").is_file() else run_dir.parent) / "export"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("model.onnx" if format == "onnx" else "model.pt")
    example = torch.randn(2, prep.in_chans, prep.img_size, prep.img_size)
    if format == "onnx":
        _require("onnx", "onnxscript", "onnxruntime")
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          opset_version=opset, dynamo=True, external_data=False, verbose=False)
        run = _onnx_runner(path)
    else:
        with torch.no_grad():
            scripted = torch.jit.trace(model, example)
        scripted.save(str(path))
        run = _torchscript_runner(path)
    batch = parity_batch(run_dir, prep)
    with torch.no_grad():
        want = model(batch).numpy()
    got = np.concatenate([run(batch[i : i + 8].numpy()) for i in range(0, len(batch), 8)])
    parity = {"images": len(batch), "max_abs_logit_diff": float(np.abs(got - want).max()),
              "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()), "tolerance": tolerance}
    record = {"format": format, "file": path.name, "classes": meta["classes"], "preprocessing": prep.to_dict(),
              "input": {"name": "images", "dtype": "float32", "shape": ["batch", prep.in_chans, prep.img_size,
                                                                         prep.img_size],
                        "note": "RGB scaled to 0..1, resized so the short side is preprocessing.img_size / crop_pct, "
                                "center-cropped, then normalized with mean and std"},
              "output": {"name": "logits", "shape": ["batch", len(meta["classes"])]},
              "opset": opset if format == "onnx" else None, "parity": parity,
              "architecture": meta["architecture"]}
    (out / "model.json").write_text(json.dumps(record, indent=1))
    if parity["max_abs_logit_diff"] > tolerance or parity["top1_agreement"] < 1.0:
        raise UserError(f"The {format} export at '{path}' disagrees with the PyTorch model on {len(batch)} images: "
                        f"max |logit diff| {parity['max_abs_logit_diff']:.2e} (tolerance {tolerance:g}), top-1 "
                        f"agreement {parity['top1_agreement']:.3f}. Do not deploy it; report this with the model name.")
    return {"path": str(path), **parity}


def parity_batch(run_dir: Path, prep: Preprocessing) -> torch.Tensor:
    """Up to 32 validation images of the run (test or train if it has no val), preprocessed; random
    tensors for a bare bundle without its run directory."""
    run = next((p for p in (run_dir, run_dir.parent) if (p / "split.json").is_file()), None)
    if run is not None:
        from transferkit.config import TrainConfig
        from transferkit.data import load_data

        data = load_data(TrainConfig.load(run / "config.yaml").data, split_file=str(run / "split.json"))
        samples = next((data.splits[s] for s in ("val", "test", "train") if data.splits.get(s)), [])
        if samples:
            transform = eval_transform(prep)
            return torch.stack([transform(data.read(ref, prep.in_chans, prep.resize))
                                for ref, _ in samples[:PARITY_IMAGES]])
    return torch.randn(PARITY_IMAGES, prep.in_chans, prep.img_size, prep.img_size, generator=torch.Generator().manual_seed(0))


def _onnx_runner(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.astype(np.float32)})[0]


def _torchscript_runner(path: Path):
    scripted = torch.jit.load(str(path))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(x)).numpy()

    return run


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}: pip install 'transferkit[export]' "
                        "(onnx, onnxscript, onnxruntime).")
