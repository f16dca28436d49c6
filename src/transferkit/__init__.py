"""transferkit: fine-tune pretrained models on your own images, offline-first.

    run = transferkit.train(data="path/to/images", strategy="finetune")
    clf = transferkit.load(run.best)
    clf.predict(["a.jpg"])
    study = transferkit.tune(data="path/to/images", trials=16)   # runs/tune-images/best.yaml

Heavy modules (torch, timm) load on first use, so `import transferkit` and the CLI's
`--help` stay fast. Importing the library changes nothing global: the CLI alone installs the import
hook that loads timm and torchvision without TorchDynamo (`core.imports.defer_dynamo`); a program
may call it too.
"""

from __future__ import annotations

from transferkit.core.version import __version__

__all__ = ["Preempted", "TrainConfig", "UserError", "evaluate", "load", "rank", "train", "tune", "__version__"]


def __getattr__(name: str):
    if name == "train":
        from transferkit.training.recipe import train

        return train
    if name == "tune":
        from transferkit.tuning.study import tune

        return tune
    if name == "rank":
        from transferkit.tuning.rank import rank

        return rank
    if name == "evaluate":
        from transferkit.evaluation.runs import evaluate

        return evaluate
    if name == "load":
        from transferkit.deploy.predictor import load

        return load
    if name == "TrainConfig":
        from transferkit.core.config import TrainConfig

        return TrainConfig
    if name == "UserError":
        from transferkit.core.errors import UserError

        return UserError
    if name == "Preempted":
        from transferkit.training.preempt import Preempted

        return Preempted
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
