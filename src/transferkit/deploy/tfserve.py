"""The child process that runs a SavedModel: `python -m transferkit.deploy.tfserve FOLDER` reads NHWC float32
batches from stdin and writes their logits to stdout, each framed as `savedmodel.send` frames them, until stdin
ends. It imports TensorFlow and never torch (the two crash in one process)."""

from __future__ import annotations

import os
import sys


def main(folder: str) -> None:
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever TensorFlow prints goes to stderr; stdout carries only the arrays
    import tensorflow as tf

    from transferkit.deploy.savedmodel import receive, send

    signature = tf.saved_model.load(folder).signatures["serving_default"]
    name = next(iter(signature.structured_input_signature[1]))
    source = sys.stdin.buffer
    while True:
        try:
            batch = receive(source)
        except EOFError:
            return
        outputs = signature(**{name: tf.constant(batch)})
        send(channel, next(iter(outputs.values())).numpy())


if __name__ == "__main__":
    main(sys.argv[1])
