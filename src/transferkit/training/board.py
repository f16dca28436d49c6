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
            raise UserError(
                "--tensorboard needs the tensorboard package: pip install 'transferkit[tensorboard]'."
            ) from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/train_loss", loss, global_step)
        self.writer.add_scalar("step/lr", lr, global_step)

    def epoch(self, row: dict) -> None:
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_s", "images_per_s"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])

    def confusion(self, metrics: dict, classes: list[str], epoch: int) -> None:
        """The test confusion matrix as an image (matplotlib, counts in the cells up to 30 classes)."""
        import io

        import matplotlib
        import numpy as np
        from PIL import Image

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cm = np.array(metrics["confusion_matrix"])
        size = min(12, 2 + 0.5 * len(classes))
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(cm, cmap="Blues")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true")
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        if len(classes) <= 30:
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        image = np.asarray(Image.open(buffer).convert("RGB"))
        self.writer.add_image("test/confusion_matrix", image, epoch, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
