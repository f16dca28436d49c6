"""`--tensorboard`: real TensorBoard event files in runs/NAME/tensorboard.

Per optimizer step: the step's training loss and the head's learning rate; per epoch: train
and val loss and accuracy, epoch time; at the end: the test confusion matrix as an image.
Open with `tensorboard --logdir runs` (pip install 'transferkit[tensorboard]').
"""

from __future__ import annotations

from pathlib import Path

from transferkit.core.errors import UserError


class Board:
    """A SummaryWriter with the few things a run logs; `None`-safe use: `Board.open(...)` may return None."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'transferkit[tensorboard]'.") \
                from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/train_loss", loss, global_step)
        self.writer.add_scalar("step/lr", lr, global_step)

    def epoch(self, row: dict) -> None:
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_s", "images_per_s"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])

    def confusion(self, png: bytes, epoch: int) -> None:
        import io

        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self.writer.add_image("test/confusion_matrix", image, epoch, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
