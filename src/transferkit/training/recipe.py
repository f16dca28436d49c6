"""`transferkit.train`: a run as its steps, in order — set up, build data, build the model, plan the
phases, prepare the runtime, write the run files, build loaders and the objective, find the LR (auto),
restore a checkpoint, train the phases (each epoch: `epoch.train_one_epoch` over the task's objective,
then validate, keep the best, checkpoint), test, save.

No callbacks and no trainer hierarchy: `Recipe` owns the run's state and its methods are the steps, in
the order they run, each short. The run directory holds config.yaml, split.json, classes.json, plan.json,
metrics.jsonl (one row per epoch), metrics.json (final), last.ckpt (state to continue from, see
`checkpoint`), best/ (the bundle), top/ (with keep_top_k) and skipped.txt (files left out, see `check`).

Long module: one owner of a run's state, read top to bottom as setup, the loop, checkpoint and save (the
shape of torchtune's single-device recipes); split, it was a loop object reaching into the recipe.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from transferkit.core import distributed
from transferkit.core.checks import ignored_options
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.core.files import write_text
from transferkit.core.machine import cache_root, default_workers, pick_device, seed_everything, set_deterministic
from transferkit.core.progress import Reporter
from transferkit.core.version import __version__
from transferkit.data.check import write_skipped
from transferkit.data.imagecache import cached_images
from transferkit.data.loaders import make_loader
from transferkit.data.sources import SPLITS, config_data
from transferkit.deploy.bundle import load_bundle, save_bundle
from transferkit.evaluation.passes import evaluate_loader
from transferkit.evaluation.report import build_report, save_predictions
from transferkit.models.classifier import layer_groups
from transferkit.models.features import feature_loaders
from transferkit.models.objective import Term
from transferkit.models.task import Task, task_for
from transferkit.training import budget
from transferkit.training.adapt import adaptation_for, saved_terms, select_rule
from transferkit.training.board import Board
from transferkit.training.checkpoint import get_rng_state, load_resume, resumed_plan, save_checkpoint, set_rng_state
from transferkit.training.epoch import EpochContext, EpochSums, Guard, Update, out_of_memory_stops, train_one_epoch
from transferkit.training.lrfind import RULE as LR_RULE
from transferkit.training.lrfind import lr_find
from transferkit.training.optim import make_optimizer, warmup_cosine
from transferkit.training.precision import runtime_for, serving_check
from transferkit.training.preempt import Preempted, StopSignals
from transferkit.training.profile import StepProfiler
from transferkit.training.regularize import L2SP
from transferkit.training.rundir import all_finite, default_name, keep_top, make_run_dir, prune_top, score_key
from transferkit.training.strategy import (
    Phase,
    apply_phase,
    count_trainable,
    make_plan,
    set_train_mode,
    trainable_groups,
)


@dataclass
class Progress:
    """Where the run is: `epoch` epochs done plus `sums.step` steps of the next (a mid-epoch checkpoint),
    the best score so far and what goes with it. Saved in last.ckpt."""

    epoch: int = 0
    sums: EpochSums = field(default_factory=EpochSums)
    best: dict = field(default_factory=lambda: {"epoch": None, "val_accuracy": -1.0, "val_loss": math.inf})
    since_best: int = 0
    top: list = field(default_factory=list)
    nan_skipped: int = 0
    best_val_logits: object = None
    """The best epoch's validation logits (the report's calibration reuses them; not saved)."""


@dataclass
class PhaseState:
    """What trains in the phase under way: its index, optimizer, schedule, loaders and wrapped model."""

    index: int
    phase: Phase
    update: Update
    train_loader: object
    val_loader: object
    head_only: bool
    objective: nn.Module
    """The run's objective set for this phase (what runs below the head, how batches move), DDP-wrapped
    with several processes."""
    move: object
    """A batch's inputs to the device: cached features as they are, else the task's inputs (`Task.move`)."""


def counted(n: int, noun: str) -> str:
    """'1 image', '15 texts', '1 class', '3 classes': `n` and `noun`, plural unless n is 1. A run's
    samples are its data's kind (`Data.kind`: image or text)."""
    plural = f"{noun}es" if noun.endswith("s") else f"{noun}s"
    return f"{n} {noun if n == 1 else plural}"


RATE = {"image": "img/s", "text": "texts/s"}
"""The epoch line's training speed, by the data's kind."""


@dataclass
class Run:
    """What `train` returns: where the run lives and how it scored."""

    dir: Path
    config: TrainConfig
    metrics: dict
    """metrics.json: test metrics, best epoch, best validation score, timings."""

    @property
    def best(self) -> Path:
        return self.dir / "best"


def train(
    config: TrainConfig | None = None,
    *,
    report: Reporter | None = None,
    resume: str | Path | None = None,
    on_epoch: Callable[[dict], bool] | None = None,
    terms: tuple[Term, ...] = (),
    task: Task | None = None,
    score_test: bool = True,
    **overrides,
) -> Run:
    """Fine-tune a pretrained backbone on `data`; see TrainConfig for every option.

    Example: `transferkit.train(data="builtin:faces", strategy="linear-probe", epochs=5)`.
    `report` replaces the default progress display (compare passes a silent one).
    `resume="runs/NAME"` continues that run from its last.ckpt with its own config, split and plan;
    `overrides` may then change only what `checkpoint.RESUMABLE_CHANGES` allows (e.g. epochs).
    `on_epoch(row)` sees each epoch's metrics row (validation included) and may stop the run by
    returning True (a tuner's pruner); `terms` add to every micro-batch's loss
    (see `models.objective.Term`); `task` replaces the config's (see `models.task`).
    `score_test` False leaves the test split unscored (a tuner's trials: only validation may steer them).
    Raises `Preempted` after saving last.ckpt when SIGTERM or SIGINT arrives.
    """
    recipe = Recipe(config, report, resume, overrides, on_epoch, terms, task, score_test)
    try:
        for step in STEPS:  # each step's seconds go to metrics.json's "steps_s": where a run's time went
            tick = time.perf_counter()
            getattr(recipe, step)()
            recipe.steps_s[step] = round(time.perf_counter() - tick, 3)
    except BaseException:
        recipe.discard_unstarted()
        raise
    return recipe.save()


STEPS = (
    "setup",
    "build_data",
    "build_model",
    "plan_phases",
    "prepare_runtime",
    "check_budget",
    "write_run_files",
    "build_loaders",
    "build_objective",
    "find_lr",
    "restore",
    "train_phases",
    "test",
)
"""The steps of a run, in order (`Recipe`'s methods); `Recipe.save` ends it."""


class Recipe:
    """One training run as its steps, in the order `train` calls them; each reads and sets the run's
    state on `self` (config, data, model, plan, loaders, progress)."""

    def __init__(self, config, report, resume, overrides, on_epoch=None, terms=(), task=None, score_test=True):
        self.state, self.changes, self.resume = None, {}, resume
        if resume is not None:
            config, self.state, self.changes = load_resume(Path(resume), overrides)
        else:
            config = config.replace(**overrides) if config is not None else TrainConfig.from_dict(overrides)
        self.config, self.report, self.on_epoch, self.extra_terms = config, report, on_epoch, tuple(terms)
        self.task, self.score_test = task, score_test
        self.started, self.steps_s = time.perf_counter(), {}
        # time to build or open caches, and the feature cache's hits and misses (splits read or extracted)
        self.cache_s = {
            "image_cache_s": 0.0,
            "feature_cache_s": 0.0,
            "feature_cache_hits": 0,
            "feature_cache_misses": 0,
        }

    def discard_unstarted(self) -> None:
        """A new run that failed before its first checkpoint leaves no folder behind: its name stays free and
        nothing half-made asks to be resumed. A run with a last.ckpt keeps everything (it can resume)."""
        run_dir = getattr(self, "run_dir", None)
        if self.state is None and run_dir is not None and self.d.main and not (run_dir / "last.ckpt").exists():
            shutil.rmtree(run_dir, ignore_errors=True)

    def setup(self) -> None:
        """Join torchrun's group if there is one; seeds, determinism, device, progress display."""
        self.d, rank_device = distributed.setup(self.config.device)  # one process, or a rank of torchrun's
        self.report = self.report or Reporter(self.config.quiet, silent=not self.d.main)
        seed_everything(self.config.seed)
        set_deterministic(self.config.deterministic)
        self.device = rank_device or pick_device(self.config.device)

    def build_data(self) -> None:
        """The classes and the split: a resumed run's own (few-shot selection included), else a new one; the
        task that reads them (images or text)."""
        c = self.config
        if self.state is not None:
            self.data = config_data(c, Path(self.resume) / "split.json")
        else:
            self.data = config_data(c)
        self.task = self.task or task_for(self.data)

    def build_model(self) -> None:
        """The task's encoder + new head, its preprocessing and layer groups; the loader workers for this data."""
        c, data = self.config, self.data
        self.model, self.record, self.prep = self.task.build(c, len(data.classes), data.default_img_size)
        self.workers = (
            c.workers if c.workers is not None else default_workers(data.arrays is not None, self.device.type == "cuda")
        )
        self.groups = layer_groups(self.model.backbone)

    def plan_phases(self) -> None:
        """The run directory and the plan of phases: a resumed run's own, or a new one (LR scaled once)."""
        c, d = self.config, self.d
        if self.state is not None:
            self.run_dir = Path(self.resume)
            self.plan = resumed_plan(self.state, c, len(self.groups))
            planned = sum(phase.epochs for phase in self.plan)
            if self.state["epoch"] >= planned and (self.run_dir / "metrics.json").is_file():
                raise UserError(
                    f"'{self.run_dir}' is complete: it trained all {planned} epochs and was tested. To train it "
                    f"longer: `transferkit train --resume {self.run_dir} --epochs {planned + 5}`; to re-test it: "
                    f"`transferkit evaluate {self.run_dir}`."
                )
            if self.changes and d.main:
                self._save_config()
        else:
            run_dir = (
                make_run_dir(Path(c.runs_dir), c.name or default_name(c), auto=c.name is None, overwrite=c.overwrite)
                if d.main
                else None
            )
            self.run_dir = Path(d.gather(str(run_dir))[0])  # rank 0 picked it
            c = c.replace(
                model=self.record["model"], img_size=self.prep.img_size, workers=self.workers, name=self.run_dir.name
            )
            if c.lr_scaling != "none" and c.lr != "auto":  # config.yaml keeps the LR actually used
                scaled = distributed.scaled_lr(c.lr, c.batch_size, c.lr_scaling, c.lr_base_batch)
                self.report.info(
                    f"[transferkit] lr {c.lr:g} scaled ({c.lr_scaling}, batch {c.batch_size} "
                    f"against {c.lr_base_batch}) to {scaled:g}"
                )
                c = c.replace(lr=scaled, lr_scaling="none")
            self.config, self.plan = c, make_plan(c, len(self.groups))
        distributed.check_batch(self.config.batch_size, self.config.accumulate, d, len(self.data.splits["train"]))

    def prepare_runtime(self) -> None:
        """Precision, memory format, threads, compile (see `runtime`); the model on its device."""
        c, d = self.config, self.d
        self.rt = runtime_for(c, self.model, self.prep, self.plan, self.device, self.workers, d, self.report)
        if c.sync_bn and d.on:  # BatchNorm statistics over the global batch (timm's version keeps act layers)
            from timm.layers import convert_sync_batchnorm

            self.model = convert_sync_batchnorm(self.model)
        self.rt.prepare(self.model)
        if self.rt.compile:  # the backbone's forward, which the objective and the passes call; same state_dict keys
            self.model.backbone.compile()
        self.setting = {
            **self.rt.to_dict(),
            "processes": d.world,
            "global_batch": c.batch_size,
            "accumulate": c.accumulate,
            "micro_batch": c.batch_size // (c.accumulate * d.world),
            "sync_bn": c.sync_bn and d.on,
        }

    def write_run_files(self) -> None:
        """config.yaml, split.json, classes.json, plan.json (new runs), runtime.json (every start); say so."""
        c, d, data, run_dir = self.config, self.d, self.data, self.run_dir
        if d.main and self.state is None:
            self._save_config()
            data.save_split(run_dir / "split.json")
            write_text(run_dir / "classes.json", json.dumps(data.classes))
            if data.skipped:
                write_skipped(run_dir / "skipped.txt", data.skipped)
        if d.main:  # this start's, on resume too
            write_text(run_dir / "runtime.json", json.dumps(self.setting, indent=1))
        splits = "/".join(str(len(data.splits[s])) for s in ("train", "val", "test"))
        self.report.info(
            f"[transferkit] {run_dir}: {c.model} ({self.record['weights']}), {c.strategy}, "
            f"{counted(len(data.classes), 'class')}, train/val/test = {splits} ({data.how}), "
            f"{self.prep.describe()}, {len(self.groups)} layer groups, {self.device} {self.rt.describe_precision()}"
            + (f", {self.workers} loader workers" if self.workers else "")
            + (", compiled" if self.rt.compile else "")
            + (
                f"; {d.world} processes, global batch {c.batch_size} = {self.setting['micro_batch']} x {d.world} x "
                f"{c.accumulate} accumulated"
                if d.on or c.accumulate > 1
                else ""
            )
        )
        self._warn()

    def _warn(self) -> None:
        """What the user should know before training: files left out, links out of the folder, imbalance, the
        budget's shortfalls, classes missing from a split; options that change nothing in this run."""
        c, data, run_dir = self.config, self.data, self.run_dir
        if self.state is None:  # a resumed run was told when it started
            for note in ignored_options(c, n_groups=len(self.groups)):
                self.report.info(f"[transferkit] warning: {note}")
        if data.skipped:
            self.report.info(
                f"[transferkit] warning: skipped {len(data.skipped)} file(s), e.g. {data.skipped[0][0]}"
                f": {data.skipped[0][1]}; the full list is in {run_dir / 'skipped.txt'}"
            )
        if data.outside_links:
            link, target = data.outside_links[0]
            self.report.info(
                f"[transferkit] warning: {len(data.outside_links)} image file(s) are links to outside "
                f"{c.data}, e.g. {link} -> {target}; followed (--outside-links refuse leaves them out)"
            )
        counts = data.counts("train")
        if max(counts.values()) >= 10 * min(counts.values()) and c.class_weights == "none" and c.sampler == "shuffle":
            self.report.info(
                f"[transferkit] warning: classes are imbalanced (largest {max(counts.values())}, "
                f"smallest {min(counts.values())} training {data.kind}s); consider --class-weights auto or "
                "--sampler balanced"
            )
        for warning in self.budget_warnings:
            self.report.info(warning)
        for name, splits in data.missing().items():
            total = sum(data.counts(s)[name] for s in SPLITS)
            what = " and ".join({"val": "not validated", "test": "not scored"}[s] for s in splits)
            self.report.info(
                f"[transferkit] warning: class '{name}' has {counted(total, data.kind)}, too few for every "
                f"split: none in {' and '.join(splits)} ({what}); add {data.kind}s to it, or give val/ and "
                "test/ folders"
            )

    def check_budget(self) -> None:
        """Whether what the run writes will fit on its disks, and a CPU training step in memory (see `budget`):
        the estimates go to runtime.json, the warnings to the log after the run's header."""
        self.budget_warnings = []
        if self.d.main:
            memory = self.device.type == "cpu" and not self.rt.compile  # a compiled model would compile for it
            self.setting["estimates"], self.budget_warnings = budget.estimate(
                self.model,
                self.config,
                self.data,
                self.plan,
                self.prep,
                self.run_dir,
                self.setting["micro_batch"],
                memory,
            )

    def _save_config(self) -> None:
        self.config.save(self.run_dir / "config.yaml")
        write_text(self.run_dir / "plan.json", json.dumps([p.to_dict() for p in self.plan], indent=1))

    def build_loaders(self) -> None:
        """Train, val and test loaders; phases that run the backbone read decoded images from a memory map
        (see `imagecache`)."""
        c, data, prep, d = self.config, self.data, self.prep, self.d
        decoded = {}
        if c.image_cache and data.arrays is None and any(p.groups for p in self.plan):
            tick = time.perf_counter()
            decoded = {s: cached_images(data, s, prep, c, self.report, d) for s in ("train", "val") if data.splits[s]}
            self.cache_s["image_cache_s"] = time.perf_counter() - tick
            self.report.info(
                f"[transferkit] decoded-image cache ready in {self.cache_s['image_cache_s']:.1f} s "
                f"(cache {cache_root(c) / 'images'})"
            )
        if c.crop_on == "device" and "train" not in decoded:
            self.report.info(
                "[transferkit] crop_on device crops images from the decoded-image cache; this run's "
                "training images do not come from it (data held in memory, or no phase runs the "
                "backbone), so the loader workers crop them"
            )
        if c.crop_on == "device" and c.deterministic and self.device.type == "cuda":
            self.report.info(
                "[transferkit] warning: crop_on device with --deterministic has not yet been seen to "
                "finish on a GPU (README, On a GPU); crop_on auto crops deterministic runs in the workers"
            )
        on_device, task = self.rt.normalizes_on_device, self.task  # uint8 pixels to the GPU (see Runtime)
        self.loaders = {
            split: make_loader(
                data,
                split,
                task.transform(prep, c, split == "train", on_device, split in decoded),
                c,
                shuffle=split == "train",
                images=decoded.get(split),
                min_side=prep.resize,
                d=d,
                reader=task.dataset,
            )
            for split in ("train", "val", "test")
        }
        self.move = functools.partial(task.move, rt=self.rt)  # a batch's inputs to the device

    def build_objective(self) -> None:
        """The task's objective on the model (classification: cross-entropy with class weights, label smoothing
        or mixup's soft targets) with the run's terms: L2-SP, domain adaptation (`--target`) and the caller's;
        the val/test loss (plain cross-entropy, comparable across configs); which epoch is best."""
        c = self.config
        l2sp = L2SP(self.model.backbone, c.l2sp) if c.l2sp else None
        adaptation = adaptation_for(self)  # --target: domain adaptation's term
        self.terms = [term for term in (l2sp, adaptation, *self.extra_terms) if term is not None]
        self.objective = self.task.objective(self.model, c, self.data, self.terms)
        self.eval_loss = nn.CrossEntropyLoss()
        self.select = select_rule(c)

    def find_lr(self) -> None:
        """lr auto: rank 0 runs the range test on its batches, every rank takes its suggestion."""
        c, d = self.config, self.d
        if c.lr == "auto" and self.state is None:
            found = None
            if d.main:
                probe = make_plan(c.replace(lr=1e-3, lr_min=None), len(self.groups))[0]
                found = lr_find(
                    self.model,
                    self.groups,
                    probe,
                    self.loaders["train"],
                    self.objective.criterion,
                    c.replace(lr=1e-3),
                    self.rt,
                    move=self.move,
                    report=self.report,
                )
                found.save(self.run_dir)
            self.config = c.replace(lr=d.gather(found.suggestion if found else None)[0])
            self.plan = make_plan(self.config, len(self.groups))
            if d.main:
                self._save_config()
                self.report.info(
                    f"[transferkit] lr auto: {found.suggestion:.2e} ({LR_RULE}; {len(found.lrs)} steps, "
                    f"plot {self.run_dir / 'lr_find.png'})"
                )
        c = self.config
        self.meta = {
            "transferkit_version": __version__,
            "architecture": self.record,
            "classes": self.data.classes,
            "preprocessing": self.prep.to_dict(),
            "strategy": {"name": c.strategy, "plan": [p.to_dict() for p in self.plan]},
            "data": {"spec": c.data, "how": self.data.how},
        }

    def restore(self) -> None:
        """A new run starts at epoch 0; a resumed one takes the checkpoint's weights, position, scores and
        random streams, and drops the metrics rows written after it."""
        state, d, run_dir = self.state, self.d, self.run_dir
        self.progress = Progress()
        if state is None:
            if d.main:
                write_text(run_dir / "metrics.jsonl", "")
            return
        try:
            self.model.load_state_dict(state["model"])  # after L2SP took its pretrained reference
        except RuntimeError as err:
            raise UserError(
                f"'{run_dir / 'last.ckpt'}' does not fit this run's model: {str(err).splitlines()[0]}"
            ) from None
        self.progress = Progress(
            state["epoch"],
            EpochSums.from_dict(state["sums"]),
            state["best"],
            state["since_best"],
            state["top"],
            state["nan_skipped"],
        )
        if d.main:
            rows = (run_dir / "metrics.jsonl").read_text().splitlines()
            write_text(run_dir / "metrics.jsonl", "".join(r + "\n" for r in rows[: self.progress.epoch]))
            prune_top(run_dir, self.progress.top)
        for term, saved in zip(self.terms, state.get("terms") or saved_terms(state, self.terms)):
            term.load_state_dict(saved)
        ranks = state.get("rng_ranks") or []  # each rank's own streams when the world size is the same
        set_rng_state(ranks[d.rank] if len(ranks) == d.world else state["rng"])
        self.report.info(
            f"[transferkit] resuming {run_dir} after epoch {self.progress.epoch}"
            + (f", step {self.progress.sums.step}" if self.progress.sums.step else "")
            + "".join(f"; {k} changed to {v!r}" for k, v in self.changes.items())
        )

    def train_phases(self) -> None:
        """Each phase of the plan in turn, epoch by epoch, from where the run stands; stops early on patience,
        on `on_epoch`, or on a signal (raising Preempted after saving last.ckpt)."""
        self.total_epochs = sum(p.epochs for p in self.plan)
        self.steps_per_epoch = len(self.loaders["train"].batch_sampler.step_sizes())  # optimizer steps
        self.board = Board(self.run_dir / "tensorboard") if self.config.tensorboard and self.d.main else None
        self.profiler = (
            StepProfiler(self.run_dir, self.config.profile_steps, self.device, self.report.info)
            if self.config.profile_steps and self.d.main
            else None
        )
        self.report.start(self.total_epochs)
        with StopSignals() as self.signals, self.rt.threads_applied(), self.profiler or contextlib.nullcontext():
            try:
                for index, phase in enumerate(self.plan):
                    before = sum(p.epochs for p in self.plan[:index])  # epochs of the earlier phases
                    if self.progress.epoch >= before + phase.epochs:
                        continue  # finished before the checkpoint
                    if self.run_phase(index, phase, before):
                        break
            finally:
                self.report.close()
                if self.board is not None:
                    self.board.close()
        if self.progress.best["epoch"] is None:
            raise UserError(
                f"No epoch of '{self.run_dir}' produced a finite model to keep; lower the LR or set --grad-clip."
            )

    def run_phase(self, index: int, phase: Phase, before: int) -> bool:
        """The phase's epochs: train one, then validate and checkpoint it. True: stop the run."""
        self.ps = ps = self.start_phase(index, phase, before)
        progress = self.progress
        for _ in range(progress.epoch - before, phase.epochs):
            ps.train_loader.batch_sampler.set_epoch(progress.epoch, skip_steps=progress.sums.step)
            tick = time.perf_counter() - progress.sums.seconds
            self.done = progress.sums  # the position to save if memory runs out mid-epoch
            set_train_mode(self.model, phase)
            self.objective.start_epoch(progress.sums.step)
            self.report.start_epoch(f"epoch {progress.epoch + 1}/{self.total_epochs}", self.steps_per_epoch)
            self.report.advance(progress.sums.step)
            guard = Guard(self.config, self.data, progress.epoch, progress.nan_skipped)
            context = EpochContext(self.rt, self.d, guard, self.report, self.after_step)
            with out_of_memory_stops(
                self.config, self.run_dir, self.d, lambda: self.done, self.save_last, ps.update.optimizer
            ):
                progress.sums = train_one_epoch(ps.objective, ps.train_loader, ps.update, progress.sums, context)
            progress.nan_skipped = guard.skipped
            progress.epoch += 1
            if self.end_epoch(time.perf_counter() - tick):
                return True
        return False

    def start_phase(self, index: int, phase: Phase, before: int) -> PhaseState:
        """Unfreeze the phase's groups; its optimizer and schedule (restored inside a resumed phase); its
        loaders (a head-only phase on a fixed backbone trains on cached features, see `features`)."""
        c, model, state, progress = self.config, self.model, self.state, self.progress
        apply_phase(model, self.groups, phase)
        extra = [p for term in self.terms for p in term.parameters()]
        optimizer = make_optimizer(model, self.groups, phase, c, extra=extra)
        # each phase warms up (at most half its length) and decays on its own
        warmup = round(min(c.warmup_epochs, phase.epochs / 2) * self.steps_per_epoch)
        scheduler = warmup_cosine(optimizer, warmup, phase.epochs * self.steps_per_epoch)
        if state is not None and index == state["phase"] and (progress.epoch, progress.sums.step) != (before, 0):
            optimizer.load_state_dict(state["optimizer"])  # resuming inside this phase
            scheduler.load_state_dict(state["scheduler"])
        head_only = (
            c.feature_cache and not phase.groups and not c.drop_path and self.objective.mixer is None and not self.terms
        )  # a term may run the whole model on rows of its own
        train_loader, val_loader = self.loaders["train"], self.loaders["val"]
        if head_only:
            tick = time.perf_counter()
            train_loader, val_loader = feature_loaders(
                model,
                self.data,
                self.prep,
                c,
                self.rt,
                self.report,
                self.loaders["train"],
                self.task,
                self.d,
                self.cache_s,
            )
            self.cache_s["feature_cache_s"] += time.perf_counter() - tick
            self.report.info(
                f"[transferkit] backbone features ready in {time.perf_counter() - tick:.1f} s "
                f"(cache {cache_root(c) / 'features'})"
            )
        norms = any(isinstance(m, nn.modules.batchnorm._NormBase) for m in self.model.backbone.modules())
        bn = f", BN {phase.bn}" if norms else ""  # a transformers encoder has none
        self.report.info(
            f"[transferkit] phase '{phase.name}': groups {phase.groups or 'none'} of "
            f"{len(self.groups)} train{bn}, {count_trainable(model):,} trainable parameters"
            + (", on cached features" if head_only else "")
        )
        objective = self.objective
        objective.encode = "full" if phase.groups else "frozen"  # below the head: the backbone, training or not
        if head_only:
            objective.encode = "features"
        objective.move = self.rt.batch if head_only else self.move
        wrapped = distributed.ddp_wrap(objective, self.d, self.device)  # what trains in this phase
        update = Update(optimizer, scheduler, c.grad_clip)
        return PhaseState(index, phase, update, train_loader, val_loader, head_only, wrapped, objective.move)

    def save_last(self, where: EpochSums) -> None:
        """last.ckpt at the current position (rank 0 writes it, with every rank's random streams); `where`
        holds the steps done in this epoch."""
        d, p, ps = self.d, self.progress, self.ps
        rngs = d.gather(get_rng_state())
        if d.main:
            save_checkpoint(
                self.run_dir / "last.ckpt",
                {
                    "model": self.model.state_dict(),
                    "optimizer": ps.update.optimizer.state_dict(),
                    "scheduler": ps.update.scheduler.state_dict(),
                    "config": self.config.to_dict(),
                    "plan": [phase.to_dict() for phase in self.plan],
                    "phase": ps.index,
                    "epoch": p.epoch,
                    "step": where.step,
                    "sums": asdict(where),
                    "best": p.best,
                    "since_best": p.since_best,
                    "top": p.top,
                    "nan_skipped": p.nan_skipped,
                    "rng": rngs[0],
                    "rng_ranks": rngs if d.on else [],
                    "terms": [term.state_dict() for term in self.terms],
                },
            )
        d.barrier()  # no rank leaves (or is stopped by torchrun) before the file is whole

    def after_step(self, where: EpochSums, step_loss: float) -> None:
        """After each step: log it; inside an epoch, stop on a signal (any rank's) or write a step
        checkpoint when one is due. `self.done` keeps the position (if memory runs out next step)."""
        self.done, epoch, steps = where, self.progress.epoch, self.steps_per_epoch
        if self.profiler is not None:
            self.profiler.step()
        if self.board is not None:
            self.board.step(epoch * steps + where.step, step_loss, self.ps.update.optimizer.param_groups[-1]["lr"])
        if where.step == steps:
            return  # the epoch's end saves and checks for signals
        if self.d.sum([self.signals.signum is not None])[0]:
            self.save_last(where)
            raise Preempted(
                self.signals.signum or signal.SIGTERM, self.run_dir, f"epoch {epoch + 1}, step {where.step}"
            )
        if self.config.save_every_steps and (epoch * steps + where.step) % self.config.save_every_steps == 0:
            self.save_last(where)

    def end_epoch(self, seconds: float) -> bool:
        """Validate, log the epoch's row, keep the best (and top-k) bundles, checkpoint; True: stop (a signal
        stops by raising Preempted)."""
        c, d, p, ps, model = self.config, self.d, self.progress, self.ps, self.model
        tick = time.perf_counter()
        val = None
        if len(self.data.splits["val"]):
            scored = model.head if ps.head_only else model  # on cached features, the head alone
            val = evaluate_loader(scored, ps.val_loader, self.eval_loss, self.rt, d=d, move=ps.move)
        val_logits = val.pop("logits") if val else None
        row = self.epoch_row(val, seconds, time.perf_counter() - tick)
        # best by val accuracy, ties broken by lower val loss (or by target entropy: --select); without a
        # score, the latest. A model with non-finite weights or val loss is never kept.
        score = {"epoch": p.epoch, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
        if self.select == "target-entropy":
            score["target_entropy"] = row["target_entropy"]
        scored = val is not None or "target_entropy" in score
        finite = all_finite(model) and (val is None or math.isfinite(val["loss"]))
        improved = finite and (not scored or p.best["epoch"] is None or score_key(score) > score_key(p.best))
        if improved:
            p.best, p.best_val_logits, p.since_best = score, val_logits, 0
            if d.main:
                save_bundle(self.run_dir / "best", model, {**self.meta, "metrics": {"best": p.best}})
        else:
            p.since_best += 1
        if c.keep_top_k and scored and finite:
            p.top = keep_top(self.run_dir, p.top, score, c.keep_top_k, model, self.meta, d.main)
        train_means = p.sums.means()
        p.sums = EpochSums()
        self.save_last(p.sums)
        self.report.end_epoch(
            f"epoch {p.epoch:>3} {ps.phase.name}: train loss {row['train_loss']:.4f}"
            + "".join(f" {name} {mean:.3f}" for name, mean in train_means.items())
            + (f" | val loss {val['loss']:.4f} acc {val['accuracy']:.3f}" if val else " | no val split")
            + (f" | target entropy {row['target_entropy']:.4f}" if "target_entropy" in row else "")
            + f" | {row['images_per_s']:.1f} {RATE[self.data.kind]}{' *' if improved else ''}"
        )
        if d.sum([self.signals.signum is not None])[0]:  # any rank's signal stops all of them
            raise Preempted(self.signals.signum or signal.SIGTERM, self.run_dir, f"after epoch {p.epoch}")
        if c.patience and p.since_best >= c.patience:
            self.report.info(f"[transferkit] early stop: no better {self.select} score for {c.patience} epochs")
            return True
        if self.on_epoch is not None and d.sum([bool(self.on_epoch(row))])[0]:
            self.report.info(f"[transferkit] stopped after epoch {p.epoch}: on_epoch asked to")
            return True
        return False

    def epoch_row(self, val: dict | None, seconds: float, val_seconds: float) -> dict:
        """The epoch's metrics.jsonl row (rank 0 writes it; TensorBoard gets it too): `seconds` training,
        `val_seconds` validating."""
        p, sums = self.progress, self.progress.sums
        row = {
            "epoch": p.epoch,
            "phase": self.ps.phase.name,
            "groups": trainable_groups(self.model, self.groups),
            "train_loss": sums.loss_sum / max(sums.seen, 1),
            **{f"train_{name}": mean for name, mean in sums.means().items()},  # the objective's (train_accuracy)
            "val_loss": val["loss"] if val else None,
            "val_accuracy": val["accuracy"] if val else None,
            "lr": self.ps.update.optimizer.param_groups[0]["lr"],
            "images_per_s": sums.seen / seconds,
            "epoch_s": seconds,
            "val_s": val_seconds,
            "data_wait": sums.data_s / max(sums.seconds, 1e-9),
        }
        for term in self.terms:  # their own measures (adaptation: domain accuracy, target accuracy)
            row.update(term.epoch_metrics(self.model))
        if self.device.type == "cuda":  # the epoch's peak, training and validation
            row["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.d.main:
            with (self.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if self.board is not None:
            self.board.epoch(row)
        return row

    def test(self) -> None:
        """The best checkpoint on the test split, exactly as shipped (loaded back from best/), and the check
        of bf16 against fp32 inference that predict relies on."""
        d, rt, p = self.d, self.rt, self.progress
        d.barrier()  # rank 0 has written best/
        self.shipped, _ = load_bundle(self.run_dir / "best")
        rt.prepare(self.shipped)
        self.test_metrics = self.test_logits = None
        scored = ["val", "test"] if self.score_test else ["val"]
        if "test" in scored and len(self.data.splits["test"]):
            self.test_metrics = evaluate_loader(
                self.shipped, self.loaders["test"], self.eval_loss, rt, self.data.classes, d, fold=True, move=self.move
            )
            self.test_logits = self.test_metrics.pop("logits")
        known = {"val": p.best_val_logits, "test": self.test_logits}
        self.checked = serving_check(
            self.shipped, [(self.loaders[s], known[s]) for s in scored], rt, d, self.report, self.move
        )
        self.metrics = {
            "test": self.test_metrics,
            "best": p.best,
            "select": self.select,
            "epochs_run": p.epoch,
            "trainable_params": count_trainable(self.model),
            "nan_skipped_steps": p.nan_skipped,
            "skipped_files": len(self.data.skipped),
            **self.cache_s,
            "runtime": self.setting,
            "precision_check": self.checked,
            "wall_time_s": time.perf_counter() - self.started,
        }

    def save(self) -> Run:
        """metrics.json, predictions, the final bundle (with test metrics and the precision check), the
        result line, then report.html."""
        d, run_dir, test, best = self.d, self.run_dir, self.test_metrics, self.progress.best
        self.metrics["steps_s"] = self.steps_s
        if d.main:
            write_text(run_dir / "metrics.json", json.dumps(self.metrics, indent=1))
            save_predictions(run_dir, {"test": self.test_logits, "val": self.progress.best_val_logits})
            save_bundle(
                run_dir / "best",
                self.shipped,
                {**self.meta, "metrics": {"best": best, "test": _headline(test)}, "precision": self.checked},
            )
            if self.board is not None and test is not None:
                board = Board(run_dir / "tensorboard")
                board.confusion(test, self.data.classes, self.progress.epoch)
                board.close()
            recall = (
                ", ".join(f"{c} {m['recall']:.2f}" for c, m in list(test["per_class"].items())[:20])
                + (f" (no test images for {', '.join(test['absent'])})" if test.get("absent") else "")
                if test
                else ""
            )
            self.report.info(
                f"[transferkit] best epoch {best['epoch']}; test "
                + (
                    f"accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} on "
                    f"{counted(test['n'], self.data.kind)}; recall {recall}"
                    if test
                    else "not scored (asked not to)"
                    if not self.score_test
                    else "skipped (no test split)"
                )
                + f"; saved {run_dir / 'best'}"
            )
            if self.config.html_report:  # the run is complete, saved and told: a failing report only warns
                try:
                    self.report.info(f"[transferkit] report: {build_report(run_dir, str(self.device), self.data)}")
                except (UserError, OSError) as err:
                    self.report.info(
                        f"[transferkit] warning: no report.html ({err}); retry with `transferkit report {run_dir}`"
                    )
        d.barrier()
        return Run(dir=run_dir, config=self.config, metrics=self.metrics)


def _headline(test: dict | None) -> dict | None:
    return None if test is None else {k: test[k] for k in ("accuracy", "macro_f1", "n", "loss")}
