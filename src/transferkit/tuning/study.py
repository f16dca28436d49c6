"""`transferkit.tune`: an Optuna study over the training config, each trial an ordinary run.

Layout of runs/NAME: study.db (the SQLite storage, unless --storage names another), split.json (every
trial's split, made once), trials/NNNN (one run directory per trial; NNNN-seedK with several seeds),
best.yaml (the best trial's config, re-runnable with `transferkit train --config`), best.json (its
validation score and, scored once, its test metrics), study.json and report.html (see `studyreport`).

- Trials optimise the best validation accuracy of their runs (the mean over `seeds_per_trial` seeds);
  they never score the test split. Only the final best config is scored on it.
- Each epoch's validation accuracy goes to the pruner (median or Hyperband); a pruned run stops there.
- `trials` is the study's total of finished (complete or pruned) trials over every worker, process or
  machine sharing the storage. Before each trial a worker counts the finished and running ones; when
  two workers race for the last place, the later trial (by number) ends at once as FAIL marked
  `surplus`, so exactly `trials` finish.
- A worker killed mid-trial stops its heartbeat; once the grace period passes, the next worker to
  look marks that trial FAIL and queues a retry of the same parameters.
- A trial that fails (a refused combination, NaN, out of memory) is FAIL with its reason; the study
  goes on. Five failures in a row stop a worker, naming the last reason.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from transferkit.core.checks import ignored_options
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.core.machine import machine_cores
from transferkit.core.progress import Reporter
from transferkit.core.registry import TASKS
from transferkit.data.sources import config_data
from transferkit.training.preempt import Preempted
from transferkit.training.recipe import train
from transferkit.tuning.space import Dimension, draw, space_for
from transferkit.tuning.summary import params_text

PRUNERS = ("median", "hyperband", "none")
FAILURES_IN_A_ROW = 5


@dataclass
class Plan:
    """What every worker of a study needs (picklable: local workers are spawned processes)."""

    base: TrainConfig
    dims: tuple[Dimension, ...]
    trials: int
    storage: str
    study: str
    seeds: int = 1
    pruner: str = "median"
    heartbeat: int = 20
    timeout: float | None = None
    shared: bool = False
    """The storage was named (--storage): workers on other machines may join, so samplers seed apart."""


class TrialFailed(Exception):
    """A trial's run failed for a reason of its own (recorded on the trial); the study goes on."""


def tune(
    config: TrainConfig | None = None,
    trials: int = 16,
    *,
    fixed=None,
    search: tuple[Dimension, ...] | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study: str | None = None,
    seeds_per_trial: int = 1,
    pruner: str = "median",
    workers: int = 1,
    heartbeat: int = 20,
    models: list[str] | None = None,
    top_k: int = 2,
    report: Reporter | None = None,
    **overrides,
) -> dict:
    """Run (or continue) the study runs/NAME until it has `trials` finished trials; return its summary
    (also in runs/NAME/study.json). `config` holds the data and every fixed option; `fixed` names the
    fields the user fixed (they leave the space); `search` replaces the default space (see `space`).
    `models`: backbones ranked by LogME first (runs/NAME/rank.json); the `top_k` best join the space.

    Example: `transferkit.tune(data="builtin:faces", trials=16, epochs=5)`: `overrides` set config fields,
    fixed for every trial (`fixed` defaults to their names)."""
    config = (config or TrainConfig()).replace(**overrides)
    fixed = set(overrides) if fixed is None else set(fixed)
    report = report or Reporter(quiet=True)
    _check_counts(trials, seeds_per_trial, workers, pruner, heartbeat)
    if storage is not None:
        _check_storage(storage)
    name = config.name or f"tune-{_stem(config.data)}"
    folder = Path(config.runs_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    split = _fixed_split(config, folder / "split.json")
    threads = config.threads if config.threads is not None or workers == 1 else max(1, machine_cores() // workers)
    base = config.replace(
        split_file=str(split),
        runs_dir=str(folder / "trials"),
        name=None,
        overwrite=True,
        quiet=True,
        html_report=False,
        threads=threads,
    )
    kind = json.loads(split.read_text()).get("kind", "image")  # a text study searches no image settings
    dims = space_for(search, fixed | set(TASKS.load(kind).unused), base) + _ranked(
        models, top_k, fixed, base, folder, report
    )
    for note in _unsearched(search, fixed, TASKS.load(kind).unused, kind, config):
        report.info(f"[transferkit] warning: {note}")
    if "strategy" not in {d.field for d in dims}:  # a searched strategy uses each option in some trials
        for note in ignored_options(config, given=fixed):
            report.info(f"[transferkit] warning: {note}")
    plan = Plan(
        base,
        dims,
        trials,
        storage or f"sqlite:///{folder / 'study.db'}",
        study or name,
        seeds_per_trial,
        pruner,
        heartbeat,
        timeout,
        shared=storage is not None,
    )
    report.info(
        f"[transferkit] study '{plan.study}' in {folder} ({_redact(plan.storage)}): {trials} trials, "
        f"{workers} worker(s); searching " + "; ".join(d.describe() for d in plan.dims)
    )
    if workers > 1:
        spawn = multiprocessing.get_context("spawn")
        procs = [spawn.Process(target=work, args=(plan, i)) for i in range(1, workers)]
        for p in procs:
            p.start()
        work(plan, 0, report)
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):  # its own traceback or message came first
            report.info(
                f"[transferkit] warning: {sum(bool(p.exitcode) for p in procs)} worker process(es) "
                "stopped with an error; the summary below covers what finished"
            )
    else:
        work(plan, 0, report)
    from transferkit.tuning.summary import summarise

    return summarise(plan, folder, config, report)


def work(plan: Plan, worker: int, report: Reporter | None = None) -> None:
    """One worker: trials until the study has `plan.trials` finished ones (or the timeout passes)."""
    import optuna

    report = report or Reporter(quiet=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = open_study(plan, worker)
    started, failures = time.perf_counter(), 0
    while True:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAIL, and a retry queued
        states = [t.state for t in study.get_trials(deepcopy=False)]
        done = sum(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states)
        running = states.count(optuna.trial.TrialState.RUNNING)
        if done >= plan.trials or (plan.timeout and time.perf_counter() - started > plan.timeout):
            return
        if done + running >= plan.trials:  # the last places are taken; they may still fail
            time.sleep(min(2.0, plan.heartbeat / 2))
            continue
        try:
            study.optimize(lambda t: objective(t, plan), n_trials=1, catch=(TrialFailed,))
        except Preempted:
            report.info(
                "[transferkit] study interrupted; the trial under way is marked failed. Run the same "
                "tune command again to continue the study."
            )
            raise
        last = max(
            (t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == _me()), key=lambda t: t.number
        )
        report.info(_line(last, study, plan.trials))
        failed = last.state == optuna.trial.TrialState.FAIL and not last.user_attrs.get("surplus")
        failures = failures + 1 if failed else 0
        if failures >= FAILURES_IN_A_ROW:
            raise UserError(
                f"{failures} trials in a row failed; the last: {last.user_attrs.get('error')}. "
                "Fix that and run the same command again: the study continues."
            )


def open_study(plan: Plan, worker: int):
    """The study on its storage, with heartbeats and retries, created on first use."""
    import optuna
    import sqlalchemy

    engine = {"connect_args": {"timeout": 60}} if plan.storage.startswith("sqlite") else {}
    for attempt in range(10):  # workers starting together on a new database race to create its tables
        try:
            storage = optuna.storages.RDBStorage(
                plan.storage,
                engine_kwargs=engine,
                heartbeat_interval=plan.heartbeat,
                grace_period=3 * plan.heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as err:
            # another worker created a table or type first (SQLite says so as an OperationalError): look again
            created = not isinstance(err, sqlalchemy.exc.OperationalError) or "already exists" in str(err)
            if not created:
                raise UserError(_cannot_open(plan.storage, err)) from None
            if attempt == 9:
                raise
            time.sleep(0.2 + 0.3 * attempt)
        except ImportError as err:  # optuna's own, from SQLAlchemy's failed import of the URL's driver
            raise UserError(_no_driver(plan.storage, err)) from None
        except sqlalchemy.exc.ArgumentError as err:
            raise UserError(_cannot_open(plan.storage, err)) from None
    try:
        existing = len(optuna.load_study(study_name=plan.study, storage=storage).trials)
    except KeyError:
        existing = 0
    # a continued study or another worker must not replay the same random start
    seed = int(
        hashlib.sha256(
            json.dumps([plan.base.seed, existing, worker, _me() if plan.shared else ""]).encode()
        ).hexdigest()[:8],
        16,
    )
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, plan.trials // 3)))
    warmup = min(plan.base.epochs, max(2, plan.base.epochs // 3))  # no trial judged on its warm-up epoch
    pruner = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup),
        "hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=plan.base.epochs),
        "none": optuna.pruners.NopPruner(),
    }[plan.pruner]
    return optuna.create_study(
        storage=storage,
        study_name=plan.study,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def objective(trial, plan: Plan) -> float:
    """Train the trial's config (once per seed) on the study's split; its best validation accuracy."""
    import optuna

    trial.set_user_attr("worker", _me())
    earlier = [
        t
        for t in trial.study.get_trials(deepcopy=False)
        if t.number < trial.number
        and t.state
        in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    ]
    if len(earlier) >= plan.trials:
        trial.set_user_attr("surplus", True)
        trial.set_user_attr("error", f"surplus: {plan.trials} trials were already finished or running")
        raise TrialFailed("surplus")
    values, runs, cache, pruned = [], [], [0, 0], []
    overrides = draw(trial, plan.dims, plan.base.strategy)

    def on_epoch(row: dict) -> bool:
        trial.report(row["val_accuracy"], row["epoch"])
        if trial.should_prune():
            pruned.append(row["epoch"])
        return bool(pruned)

    for seed in range(plan.seeds):
        run_name = f"{trial.number:04d}" + (f"-seed{seed}" if plan.seeds > 1 else "")
        try:
            config = plan.base.replace(**overrides, seed=plan.base.seed + seed, name=run_name)
            run = train(
                config, report=Reporter(silent=True), on_epoch=on_epoch if seed == 0 else None, score_test=False
            )
        except Preempted:
            raise
        except Exception as err:  # the trial's own failure: recorded, and the study goes on
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise TrialFailed(str(err)) from None
        runs.append(str(run.dir))
        values.append(run.metrics["best"]["val_accuracy"])
        cache[0] += run.metrics["feature_cache_hits"]
        cache[1] += run.metrics["feature_cache_misses"]
        trial.set_user_attr("runs", runs)
        trial.set_user_attr("feature_cache", cache)  # [hits, misses] over the trial's runs
        if pruned:
            raise optuna.TrialPruned(f"pruned after epoch {pruned[0]}")
    return statistics.fmean(values)


def _line(trial, study, total: int) -> str:
    import optuna

    done = sum(
        t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        for t in study.get_trials(deepcopy=False)
    )
    params = params_text(trial.params)
    state = trial.state.name.lower()
    what = {
        "complete": f"val accuracy {trial.value:.4f}" if trial.value is not None else "",
        "pruned": "pruned",
        "fail": f"failed: {trial.user_attrs.get('error', '?')}",
    }.get(state, state)
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    return f"[transferkit] trial {trial.number} ({done}/{total} finished): {what} | {params} | {seconds:.0f} s"


def _ranked(
    models: list[str] | None, top_k: int, fixed, base: TrainConfig, folder: Path, report: Reporter
) -> tuple[Dimension, ...]:
    """A `model` dimension of the `top_k` backbones by LogME on the study's training split, or none."""
    if not models:
        return ()
    if "model" in fixed:
        raise UserError("--model fixes the backbone and --models searches over backbones: give one of them.")
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1; got {top_k}.")
    from transferkit.tuning.rank import rank

    ranked = rank(base.data, models, config=base, report=report, out=folder)
    keep = list(dict.fromkeys(row["model"] for row in ranked["rows"]))[:top_k]
    report.info(
        f"[transferkit] ranked {len(models)} backbones by LogME ({folder / 'rank.json'}); searching the "
        f"top {len(keep)}: {', '.join(keep)}"
    )
    return (Dimension("model", choices=tuple(keep)),)


def _unsearched(search, fixed: set[str], unused, kind: str, config: TrainConfig) -> list[str]:
    """Why each field of the user's `search:` section leaves the search: an option fixes it, or the data
    does not use it."""
    notes = []
    for d in search or ():
        flag = "--" + d.field.replace("_", "-")
        if d.field in fixed:
            notes.append(
                f"search field '{d.field}' is left out: {flag} {getattr(config, d.field)} fixes it for every "
                f"trial (an option wins over the search: section; drop {flag} to search it)."
            )
        elif d.field in unused:
            notes.append(f"search field '{d.field}' is left out: {kind} data does not use it.")
    return notes


def _check_counts(trials: int, seeds: int, workers: int, pruner: str, heartbeat: int) -> None:
    for key, value in (
        ("--trials", trials),
        ("--seeds-per-trial", seeds),
        ("--workers", workers),
        ("--heartbeat", heartbeat),
    ):
        if value < 1:
            raise UserError(f"{key} must be at least 1; got {value}.")
    if pruner not in PRUNERS:
        raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}; got '{pruner}'.")


def _fixed_split(config: TrainConfig, path: Path) -> Path:
    """The study's split, made once from `config` (or the given split file) and shared by every trial:
    validation images never move between trials, and test images never reach training."""
    if path.is_file():
        return path
    data = config_data(config)
    if not data.splits["val"]:
        raise UserError(
            f"'{config.data}' has no validation images, and trials are scored on them: raise "
            "--val-fraction above 0, or add a val/ folder."
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data.save_split(tmp)
    os.replace(tmp, path)
    return path


def _stem(data: str) -> str:
    return data.split(":", 1)[1] if ":" in data and not Path(data).exists() else Path(data.rstrip("/")).stem


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _check_storage(url: str) -> None:
    """A --storage URL that SQLAlchemy cannot read, or whose driver is missing, fails before the study's
    folder is made."""
    import sqlalchemy

    try:
        sqlalchemy.engine.make_url(url).get_dialect().import_dbapi()
    except ImportError as err:
        raise UserError(_no_driver(url, err)) from None
    except sqlalchemy.exc.ArgumentError as err:
        raise UserError(_cannot_open(url, err)) from None


def _cannot_open(url: str, err: Exception) -> str:
    return (
        f"Cannot open the study's storage {_redact(url)}: {str(err).splitlines()[0]}. Check the URL (e.g. "
        "postgresql://user:password@host/db) and that the server is up."
    )


def _no_driver(url: str, err: ImportError) -> str:
    """What to install when the storage URL's database driver is missing."""
    cause = err.__cause__ if isinstance(err.__cause__, ImportError) else err
    module = getattr(cause, "name", None) or str(cause)
    fix = f"`pip install {module}`"
    if module in ("psycopg", "psycopg2"):
        fix = (
            "`pip install 'transferkit[postgres]'` installs both PostgreSQL drivers (psycopg for "
            "postgresql://, psycopg2 for postgresql+psycopg2://)"
        )
    elif url.startswith("postgres"):
        fix += ", or write postgresql://, whose driver `pip install 'transferkit[postgres]'` installs"
    return f"The study's storage {_redact(url)} needs the database driver '{module}', which is not installed: {fix}."


def _redact(url: str) -> str:
    """The storage URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        user = rest.split("@", 1)[0].split(":", 1)[0]
        return f"{scheme}://{user}:***@{rest.split('@', 1)[1]}"
    return url
