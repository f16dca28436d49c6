"""TensorFlow SavedModel export: onnx2tf converts the ONNX export, in a child process that has TensorFlow and
not torch (the two crash in one process: a segfault with TensorFlow 2.21 beside torch 2.14); another child runs it.

Why this route: litert-torch (the TFLite route) writes flatbuffers without TensorFlow and has no SavedModel;
onnx2tf is the maintained ONNX-to-TensorFlow converter. Its releases from 1.29 pin exact versions of TensorFlow,
NumPy and ONNX that clash with this environment; 1.28.8 is the last without pins, and converts with TensorFlow
2.21 and NumPy 2. It turns a mean over negative axes ([-1, -2], as torch.onnx writes a global average pool) into
a mean over the batch when it moves the graph to NHWC, so the axes are made positive first. The SavedModel takes
NHWC float images (TensorFlow's layout: onnx2tf moves the transposes into the graph's start), batch dynamic; with
preprocessing, uint8 images of any size. `tfserve convert` writes it, `tfserve serve` runs it, arrays going
through the child's stdin and stdout.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferkit.core.errors import UserError

MODULES = ("onnx2tf", "tensorflow", "tf_keras", "onnx_graphsurgeon", "sng4onnx", "psutil", "onnx", "onnxruntime")


def quiet() -> dict[str, str]:
    """A TensorFlow child's environment, as this process's is now: TensorFlow's C++ log off, no GPU probing
    (the export and its runner work on the CPU)."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def require() -> None:
    """A clear error naming the extra when the converter or TensorFlow is missing."""
    import importlib.util

    missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"SavedModel export needs {', '.join(missing)}: pip install 'transferkit[savedmodel]' "
            "(onnx2tf 1.28.8 with TensorFlow, tf-keras and ONNX)."
        )


def write_saved_model(onnx_path: Path, folder: Path, preprocessing: dict | None = None) -> None:
    """Convert the ONNX file at `onnx_path` into a SavedModel in `folder` (a new folder) whose signature takes
    `images` and gives `logits`; with `preprocessing` ({resize, img_size, mean, std}), uint8 images of any size."""
    require()
    positive_axes(onnx_path)
    command = [
        sys.executable,
        "-m",
        "transferkit.deploy.tfserve",
        "convert",
        str(onnx_path),
        str(folder),
        json.dumps(preprocessing or {}),
    ]
    with tempfile.TemporaryFile() as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=quiet())
        log.seek(0)
        said = log.read().decode(errors="replace")
    if done.returncode != 0 or not (folder / "saved_model.pb").is_file():
        raise UserError(
            f"onnx2tf and TensorFlow could not write the SavedModel '{folder}' (exit {done.returncode}); "
            "their last words:\n" + "\n".join(line for line in said.splitlines()[-40:] if "TensorSpec" not in line)
        )


def positive_axes(onnx_path: Path) -> None:
    """Rewrite, in place, the constant negative axes of Reduce* nodes as positive ones (onnx2tf mistranslates
    negative axes when it transposes a graph to NHWC)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.input, *inferred.value_info)}
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type.startswith("Reduce") and len(node.input) > 1 and node.input[1] in constants:
            axes = numpy_helper.to_array(constants[node.input[1]])
            rank = ranks.get(node.input[0])
            if rank and (axes < 0).any():
                fixed = numpy_helper.from_array(
                    np.sort(np.where(axes < 0, axes + rank, axes)).astype(axes.dtype), node.input[1] + "_positive"
                )
                model.graph.initializer.append(fixed)
                node.input[1] = fixed.name
    onnx.save(model, str(onnx_path))


def saved_model_runner(folder: Path) -> Callable[[np.ndarray], np.ndarray]:
    """(batch, C, H, W) float32 -> (batch, classes) float32 logits, run by TensorFlow in a child process that
    lives as long as the runner; a SavedModel with preprocessing takes (batch, H, W, C) uint8 images as they are."""
    require()
    return _Child(Path(folder))


class _Child:
    def __init__(self, folder: Path):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the finalizer with the process)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "transferkit.deploy.tfserve", "serve", str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=quiet(),
        )
        weakref.finalize(self, _end, self.process, self.log)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        try:
            if batch.dtype != np.uint8:  # NCHW, as the other exports take it, to TensorFlow's NHWC
                batch = np.ascontiguousarray(batch.transpose(0, 2, 3, 1), np.float32)
            send(self.process.stdin, batch)
            return receive(self.process.stdout)
        except (OSError, EOFError):
            self.process.wait()
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace")[-2000:]
            raise UserError(
                f"TensorFlow's SavedModel runner stopped (exit {self.process.returncode}):\n{tail}"
            ) from None


def _end(process: subprocess.Popen, log) -> None:
    try:
        process.stdin.close()  # the child ends at the end of its input
    except OSError:  # it had stopped already
        pass
    process.wait()
    log.close()


def send(channel, array: np.ndarray) -> None:
    """One array on a byte stream: its .npy bytes after their length (8 bytes, little-endian)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    channel.write(len(data).to_bytes(8, "little") + data)
    channel.flush()


def receive(channel) -> np.ndarray:
    """The next array `send` wrote; EOFError at the end of the stream."""
    head = channel.read(8)
    if len(head) < 8:
        raise EOFError("the stream ended")
    data = channel.read(int.from_bytes(head, "little"))
    return np.load(io.BytesIO(data), allow_pickle=False)
