"""Progress display: rich bars on a terminal, one plain line per epoch with --quiet or in logs."""

from __future__ import annotations

import sys


class Reporter:
    """Epoch and batch progress with loss, accuracy and images/s."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet or not self.console.is_terminal
        self._progress = None
        self._task = None

    def info(self, message: str) -> None:
        if self.quiet:
            print(message, file=sys.stderr, flush=True)
        else:
            self.console.print(message, highlight=False)

    def start_epoch(self, description: str, n_batches: int) -> None:
        if self.quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                                  console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(description, total=n_batches, stats="")

    def batch(self, loss: float, accuracy: float, images_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1,
                                  stats=f"loss {loss:.3f} acc {accuracy:.3f} {images_per_s:.0f} img/s")

    def end_epoch(self, summary: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.info(summary)
