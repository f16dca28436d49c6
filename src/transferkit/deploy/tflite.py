"""LiteRT (TFLite) export: litert-torch converts the PyTorch model, ai-edge-quantizer makes fp16 or int8 copies.

litert-torch lowers the model through torch.export straight to a .tflite flatbuffer, without TensorFlow (onnx2tf,
the other maintained route, pins TensorFlow, NumPy and ONNX versions that clash with this environment). The model
takes one NCHW float image, batch 1 (the phone case; a dynamic batch fails to lower for TF-style padding). fp16
stores the weights as float16 (half the file), computed in fp32; int8 is static: weights and activations int8,
the ranges calibrated on images of the run's train split, input and output quantized (the runner here scales
them). The interpreter is ai-edge-litert's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from transferkit.core.errors import UserError

QUANTIZE = ("none", "fp16", "int8")
MODULES = ("litert_torch", "ai_edge_litert", "ai_edge_quantizer")


def require() -> None:
    """A clear error naming the extra when the LiteRT packages are missing."""
    import importlib.util

    missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"TFLite export needs {', '.join(missing)}: pip install 'transferkit[tf]' "
            "(litert-torch, with ai-edge-litert and ai-edge-quantizer)."
        )


@contextlib.contextmanager
def native_log_kept():
    """What C++ libraries write to file descriptor 2 inside the block (absl's notice, oneDNN's, the XNNPACK
    delegate's INFO line: Python's warning filters cannot reach them) goes to a temporary file, shown only
    when the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def write_tflite(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    quantize: str = "none",
    calibration: torch.Tensor | None = None,
) -> None:
    """Convert `model` (traced on one image shaped like `example`'s) and write `path`; fp16 and int8 are made from
    the fp32 flatbuffer, int8 calibrated on the images in `calibration`."""
    require()
    with native_log_kept():  # importing it loads TensorFlow's kernels, which announce oneDNN
        import litert_torch
        from litert_torch import progress

    quiet, progress.console.quiet = progress.console.quiet, True  # its step-by-step log says nothing to a user
    flat = path.with_name(".fp32-" + path.name)
    try:
        with torch.no_grad(), native_log_kept():
            converted = litert_torch.convert(model.eval(), (example[:1],))
            converted.export(str(path if quantize == "none" else flat))
            if quantize != "none":
                path.write_bytes(_quantized(flat, quantize, calibration))
    finally:
        progress.console.quiet = quiet
        flat.unlink(missing_ok=True)


def _quantized(flat: Path, quantize: str, calibration: torch.Tensor | None) -> bytes:
    from ai_edge_quantizer import qtyping, quantizer, recipe, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    if quantize == "fp16":
        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )
        return (
            quantizer.Quantizer(str(flat), manager.get_quantization_recipe())
            .quantize(enable_progress_bar=False, enable_progress_report=False)
            .quantized_model
        )
    q = quantizer.Quantizer(str(flat), recipe.static_wi8_ai8())
    signature, name = _signature(flat)
    ranges = q.calibrate({signature: [{name: image[None].numpy()} for image in calibration]})
    return q.quantize(ranges, enable_progress_bar=False, enable_progress_report=False).quantized_model


def _signature(path: Path) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    signature = next(iter(signatures))
    return signature, signatures[signature]["inputs"][0]


def tflite_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """(batch, C, H, W) float32 -> (batch, classes) float32 logits, one image at a time; an int8 model's input is
    quantized and its output dequantized with the scales stored in the file."""
    require()
    with native_log_kept():  # the XNNPACK delegate announces itself at the first call: made here
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        signature, name = _signature(path)
        runner = interpreter.get_signature_runner(signature)
        given, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        runner(**{name: np.zeros(given["shape"], given["dtype"])})

    def one(x: np.ndarray) -> np.ndarray:
        if given["dtype"] != np.float32:
            scale, zero = given["quantization"]
            info = np.iinfo(given["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(given["dtype"])
        y = next(iter(runner(**{name: x}).values()))
        if y.dtype != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    return lambda batch: np.concatenate(
        [one(np.ascontiguousarray(batch[i : i + 1], np.float32)) for i in range(len(batch))]
    )
