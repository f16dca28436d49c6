"""Shared by the study tests: a PostgreSQL server on loopback (a module fixture), worker processes of one
study, and the two checks that hold on any storage (test_tune_storage.py: PostgreSQL; test_sqlite_study.py:
the default SQLite file)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import sqlalchemy

TINY = ["--img-size", "32", "--epochs", "2", "--precision", "fp32", "--quiet", "--pruner", "none"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def worker(runs: Path, storage: str | None, study: str, *args) -> subprocess.Popen:
    """A `transferkit tune` process on the study runs/STUDY; `storage` None: its default storage, the SQLite file
    runs/STUDY/study.db."""
    where = [] if storage is None else ["--storage", storage, "--study", study]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "transferkit",
            "tune",
            "builtin:faces",
            *TINY,
            "--runs-dir",
            str(runs),
            "--name",
            study,
            *where,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def load_trials(runs: Path, storage: str | None, study: str) -> list:
    """The study's trials, read from its storage (`storage` None: the default SQLite file). KeyError while the
    study does not exist yet (a SQLite file is not made here: that would race the worker making it)."""
    if storage is None and not (runs / study / "study.db").is_file():
        raise KeyError(study)
    url = storage or f"sqlite:///{runs / study / 'study.db'}"
    return optuna.load_study(study_name=study, storage=url).get_trials()


def k_workers_finish_exactly_n(runs: Path, storage: str | None) -> None:
    """Two processes, one with two workers, share a study of 4 trials: 4 finish, no more, and the work is shared."""
    procs = [
        worker(runs, storage, "shared", "--trials", "4", "--workers", "2"),
        worker(runs, storage, "shared", "--trials", "4"),
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    trials = load_trials(runs, storage, "shared")
    assert sum(t.state in FINISHED for t in trials) == 4
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in trials if t.state in FINISHED}) >= 2  # they shared the work
    for t in trials:  # a trial beyond the total ends at once, marked; nothing else fails here
        assert t.state in FINISHED or t.user_attrs.get("surplus"), t.user_attrs


def killed_mid_trial_is_retried(runs: Path, storage: str | None) -> None:
    """A worker SIGKILLed while its trial trains: the next worker marks that trial FAIL once its heartbeat is
    stale, retries it once with the same parameters, and the study ends with exactly its 3 trials finished."""
    victim = worker(runs, storage, "killed", "--trials", "3", "--heartbeat", "1")
    deadline, running = time.monotonic() + 120, None
    while running is None and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            trials = load_trials(runs, storage, "killed")
        except (KeyError, sqlalchemy.exc.OperationalError):  # the study is not created yet, or its tables
            continue
        running = next(
            (
                t
                for t in trials
                if t.state == optuna.trial.TrialState.RUNNING
                and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
                # its training started: all parameters drawn (a kill before them left none to retry with)
                and (runs / "killed" / "trials" / f"{t.number:04d}" / "config.yaml").is_file()
            ),
            None,
        )
    assert running is not None, victim.communicate()[0] if victim.poll() is not None else "no trial started"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivor = worker(runs, storage, "killed", "--trials", "3", "--heartbeat", "1")
    out = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, out
    trials = load_trials(runs, storage, "killed")
    assert sum(t.state in FINISHED for t in trials) == 3
    killed = next(t for t in trials if t.number == running.number)
    assert killed.state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == running.number]
    assert len(retried) == 1
    assert retried[0].params == killed.params
    assert retried[0].state in FINISHED
