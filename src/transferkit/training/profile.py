"""`--profile-steps N`: torch.profiler over N training steps of a run, after two to warm up, and what
runs between them (an epoch's validation and checkpoints, where the steps span an epoch's end).

It writes runs/NAME/profile.txt (the operators by their own time on the CPU and, on CUDA, on the GPU,
and how busy the GPU was over the profiled steps' wall time) and runs/NAME/profile-trace.json (a
Chrome trace: chrome://tracing or https://ui.perfetto.dev). The loader's waits show as
`enumerate(DataLoader)...__next__`. For finding where a step's time goes; it slows the steps it records.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

WARMUP_STEPS = 2
"""Steps left out before recording: the first steps pick kernels (cuDNN autotuning) and start the workers."""


class StepProfiler:
    """torch.profiler over `steps` optimizer steps after WARMUP_STEPS; `step()` after each step. Used as a
    context manager around the run's epochs: at the end it writes what was recorded (the run may end before
    the last profiled step); when the run fails, the profiler stops and the run's own error is the one raised."""

    def __init__(self, run_dir: Path, steps: int, device: torch.device, say):
        self.run_dir, self.steps, self.device, self.say = run_dir, steps, device, say
        self.seen, self.prof, self.tick = 0, None, 0.0

    def step(self) -> None:
        self.seen += 1
        if self.seen == WARMUP_STEPS:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._sync()
            prof = torch.profiler.profile(activities=activities, record_shapes=True)
            try:
                prof.__enter__()
            except RuntimeError as err:  # another profiler is running (the caller's own): the run goes on
                self.say(f"[transferkit] warning: --profile-steps not started ({err})")
                return
            self.prof, self.tick = prof, time.perf_counter()
        elif self.prof is not None and self.seen == WARMUP_STEPS + self.steps:
            self.close()

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the run's own error (a CUDA fault, a signal) is the one to see
            self.close()

    def close(self) -> None:
        """Stop recording and write profile.txt and profile-trace.json (once; nothing if nothing was recorded)."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        try:
            self._sync()
            wall = time.perf_counter() - self.tick
        finally:
            prof.__exit__(None, None, None)  # stopped whatever happens: a later run in this process profiles again
        recorded = self.seen - WARMUP_STEPS
        events = prof.key_averages()
        lines = [
            f"{recorded} training steps after {WARMUP_STEPS} warm-up steps, {wall:.3f} s wall "
            f"({wall / max(recorded, 1) * 1000:.1f} ms a step); device {self.device}"
        ]
        if self.device.type == "cuda":
            busy = (
                sum(
                    e.self_device_time_total
                    for e in events  # the kernels' and copies' own time, as table sums it
                    if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
                )
                / 1e6
            )
            lines.append(
                f"GPU busy {busy:.3f} s of {wall:.3f} s wall ({busy / wall:.0%}; kernels summed, so overlapping "
                "streams count twice): the rest of the time the GPU waited for the host (the loader, the "
                "Python loop, synchronisations)"
            )
            lines += ["", "By their own GPU time:", events.table(sort_by="self_device_time_total", row_limit=30)]
        lines += ["", "By their own CPU time:", events.table(sort_by="self_cpu_time_total", row_limit=30)]
        (self.run_dir / "profile.txt").write_text("\n".join(lines) + "\n")
        prof.export_chrome_trace(str(self.run_dir / "profile-trace.json"))
        self.say(
            f"[transferkit] profiled {recorded} steps: {self.run_dir / 'profile.txt'}, "
            f"{self.run_dir / 'profile-trace.json'}"
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
