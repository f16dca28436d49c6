"""Studies shared through a real PostgreSQL server on loopback (started here with initdb/pg_ctl in a
temporary folder; `.ci/run` installs PostgreSQL from Debian's packages where it is missing): worker
processes share one study, and a worker killed mid-trial neither stalls the study nor leaves its trial
RUNNING. The checks are functions of the storage, so test_sqlite_study.py runs the same on the default
SQLite file."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import need, needs

TINY = ["--img-size", "32", "--epochs", "2", "--precision", "fp32", "--quiet", "--pruner", "none"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this test module: its SQLAlchemy URL."""
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    need(initdb is not None, "PostgreSQL is not installed here (`.ci/run` installs it from Debian's packages)")
    bin_dir = Path(initdb).resolve().parent  # the server's own tools, not a distribution wrapper
    root = Path(tempfile.mkdtemp(prefix="tk-pg-"))
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the packages' postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(*args):
        done = subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]}: {done.stderr}"

    pg(bin_dir / "initdb", "-D", root / "data", "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg(
        bin_dir / "pg_ctl",
        "-D",
        root / "data",
        "-l",
        root / "log",
        "-w",
        "-o",
        f"-p {port} -k {root} -h 127.0.0.1",
        "start",
    )
    try:
        pg(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "tune")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/tune"
    finally:
        pg(bin_dir / "pg_ctl", "-D", root / "data", "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


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


@needs("psycopg2")  # the PostgreSQL driver comes with `pip install -e '.[dev]'`
def test_worker_processes_share_one_study_and_finish_exactly_n(postgres, tmp_path):
    k_workers_finish_exactly_n(tmp_path, postgres)


@needs("psycopg2")
def test_a_worker_killed_mid_trial_is_failed_retried_and_the_study_completes(postgres, tmp_path):
    killed_mid_trial_is_retried(tmp_path, postgres)
