"""Stopping cleanly on SIGTERM (preemption, `kill`, schedulers) and SIGINT (Ctrl-C).

While training, either signal only raises a flag: the loop finishes the step it is in, writes
last.ckpt and raises `Preempted`, which the CLI turns into exit code 143 (SIGTERM) or 130
(SIGINT) and a line saying how to resume. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class Preempted(Exception):
    """Training stopped on a signal after saving last.ckpt; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, run_dir: Path, where: str):
        self.signum, self.run_dir, self.exit_code = signum, run_dir, 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} received: saved {run_dir / 'last.ckpt'} ({where}). "
            f"Continue with: transferkit train --resume {run_dir}"
        )


class StopSignals:
    """Context manager that turns SIGTERM/SIGINT into `self.signum` while the block runs.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
