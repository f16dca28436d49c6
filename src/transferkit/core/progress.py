"""Progress display: rich bars (epochs and batches) on a terminal; plain lines with --quiet or in logs."""

from __future__ import annotations

import sys


class Reporter:
    """One progress display per run: an epoch bar, a batch bar with loss/accuracy/img/s, and a
    summary line per epoch that stays on screen."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet or silent or not self.console.is_terminal
        self.silent = silent
        self._progress = None
        self._epochs = self._batches = None

    def info(self, message: str) -> None:
        if self.silent:
            return
        if self.quiet:
            print(message, file=sys.stderr, flush=True)
        else:
            self.console.print(message, highlight=False, markup=False)  # '[transferkit]' and file names as they are

    def start(self, total_epochs: int) -> None:
        if self.quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description:>12}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}", markup=False),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._epochs = self._progress.add_task("epochs", total=total_epochs, stats="")

    def start_epoch(self, description: str, n_batches: int) -> None:
        if self._progress is None:
            return
        if self._batches is not None:
            self._progress.remove_task(self._batches)
        self._batches = self._progress.add_task(description, total=n_batches, stats="")

    def advance(self, batches: int) -> None:
        """Count batches done without stats: before this process started (a mid-epoch resume), or a pass
        that trains nothing (a cache being built)."""
        if self._progress is not None and batches:
            self._progress.update(self._batches, advance=batches)

    def batch(self, loss: float, means: dict[str, float], samples_per_s: float) -> None:
        """One step done: the epoch's running loss, the means of the objective's counts (e.g. accuracy)."""
        if self._progress is not None:
            shown = "".join(f" {name} {value:.3f}" for name, value in means.items())
            self._progress.update(
                self._batches, advance=1, stats=f"loss {loss:.3f}{shown} {samples_per_s:.0f} samples/s"
            )

    def end_epoch(self, summary: str) -> None:
        if self._progress is not None:
            self._progress.advance(self._epochs)
        self.info(summary)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
