"""TensorFlow's side of the SavedModel export, run as a child process that imports TensorFlow and never torch (the
two crash in one process):

    python -m transferkit.deploy.tfserve convert MODEL.onnx OUT PREP_JSON   # write the SavedModel
    python -m transferkit.deploy.tfserve serve FOLDER                       # run it: arrays in on stdin, logits out

`convert` has onnx2tf build the network as a Keras model (not saved: onnx2tf's own SavedModel and the TFLite
files it writes beside it would cost time and be replaced) and saves it with the signature transferkit documents:
input `images`, output `logits`. With
preprocessing in PREP_JSON (`{"resize", "img_size", "mean", "std"}`; `{}` for none) the input is uint8
(batch, H, W, C) images of any size, resized, cropped and normalized in the graph as `predict` does: the short side
to `resize` (TensorFlow's antialiased Keys cubic, a = -0.5, half-pixel centres, as PIL's bicubic), rounded and
clipped to 0..255, the center crop at torchvision's offsets, then mean and std. `serve` reads framed arrays
(`savedmodel.send`) from stdin and writes their logits to stdout until stdin ends.
"""

from __future__ import annotations

import json
import os
import sys


def convert(onnx_path: str, out: str, prep: dict) -> None:
    import onnx2tf
    import tensorflow as tf
    import tf_keras

    net = onnx2tf.convert(
        input_onnx_file_path=onnx_path, not_use_onnxsim=True, disable_model_save=True, non_verbose=True
    )  # a Keras model in NHWC: (None, S, S, C) in
    shape = net.inputs[0].shape

    def logits(x):
        y = net(x)
        return {"logits": y[0] if isinstance(y, (list, tuple)) else y}

    archive = tf_keras.export.ExportArchive()  # the one endpoint (saving the Keras model whole traces every layer)
    archive.track(net)
    if prep:
        archive.add_endpoint(
            "serving_default",
            lambda images: logits(_preprocess(tf, images, prep)),
            [tf.TensorSpec([None, None, None, shape[-1]], tf.uint8, name="images")],
        )
    else:
        archive.add_endpoint("serving_default", logits, [tf.TensorSpec([None, *shape[1:]], tf.float32, name="images")])
    archive.write_out(out)


def _preprocess(tf, images, prep: dict):
    resize, size = prep["resize"], prep["img_size"]
    hw = tf.shape(images)[1:3]
    sizes = resize * hw // tf.reduce_min(hw)  # int(resize * side / short), as torchvision's Resize(int)
    x = tf.image.resize(tf.cast(images, tf.float32), sizes, method="bicubic", antialias=True)
    x = tf.round(tf.clip_by_value(x, 0.0, 255.0))
    d = sizes - size
    k = d // 2
    start = k + (d % 2) * (k % 2)  # torchvision's center crop: round((side - size) / 2), half to even
    x = x[:, start[0] : start[0] + size, start[1] : start[1] + size, :]
    mean = tf.constant(prep["mean"], tf.float32) * 255.0
    std = tf.constant(prep["std"], tf.float32) * 255.0
    return (x - mean) / std


def serve(folder: str) -> None:
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever TensorFlow prints goes to stderr; stdout carries only the arrays
    import tensorflow as tf

    from transferkit.deploy.savedmodel import receive, send

    signature = tf.saved_model.load(folder).signatures["serving_default"]
    name, spec = next(iter(signature.structured_input_signature[1].items()))
    source = sys.stdin.buffer
    while True:
        try:
            batch = receive(source)
        except EOFError:
            return
        outputs = signature(**{name: tf.constant(batch, spec.dtype)})
        send(channel, next(iter(outputs.values())).numpy())


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "convert":
        convert(args[0], args[1], json.loads(args[2]))
    else:
        serve(args[0])
