"""Exported models as functions: a numpy batch in, numpy logits out (export checks and `predict --backend`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from transferkit.deploy.savedmodel import saved_model_runner
from transferkit.deploy.tflite import tflite_runner


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    scripted = torch.jit.load(str(path))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(x)).numpy()

    return run


BACKENDS = {
    "onnx": ("model.onnx", onnx_runner, "--format onnx"),
    "tflite": ("model.tflite", tflite_runner, "--format tflite"),
    "tflite-fp16": ("model_fp16.tflite", tflite_runner, "--format tflite --fp16"),
    "tflite-int8": ("model_int8.tflite", tflite_runner, "--format tflite --int8"),
    "saved_model": ("saved_model", saved_model_runner, "--format saved_model"),
}
"""`predict --backend`: the export file it runs (in the run's export/ folder), how, and the `transferkit export`
options that write it."""
