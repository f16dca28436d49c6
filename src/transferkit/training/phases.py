"""The epochs of a run: each phase of the plan in turn, from where the run stands; each epoch trains
(see `epoch`), validates, keeps the best and top-k bundles, writes its metrics row and last.ckpt.

`EpochLoop` works on a `Recipe`'s parts (config, model, loaders, progress...), which it holds."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from transferkit.core import distributed
from transferkit.core.errors import UserError
from transferkit.core.machine import cache_root
from transferkit.deploy.bundle import save_bundle
from transferkit.evaluation.passes import evaluate_loader
from transferkit.models.features import feature_loaders
from transferkit.training.board import Board
from transferkit.training.checkpoint import get_rng_state, save_checkpoint
from transferkit.training.epoch import (
    EpochContext,
    EpochSums,
    Guard,
    Update,
    out_of_memory_stops,
    train_one_epoch,
)
from transferkit.training.optim import make_optimizer, warmup_cosine
from transferkit.training.preempt import Preempted, StopSignals
from transferkit.training.profile import StepProfiler
from transferkit.training.rundir import all_finite, keep_top, score_key
from transferkit.training.strategy import Phase, apply_phase, count_trainable, set_train_mode, trainable_groups


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


class EpochLoop:
    """The phases and epochs of one run; stops early on patience, on `on_epoch`, or on a signal."""

    def __init__(self, recipe):
        self.r = recipe

    def run(self) -> None:
        """Each phase of the plan in turn, from where the run stands; stops early on patience or on_epoch."""
        self.total_epochs = sum(p.epochs for p in self.r.plan)
        self.steps_per_epoch = len(self.r.loaders["train"].batch_sampler.step_sizes())  # optimizer steps
        self.r.board = Board(self.r.run_dir / "tensorboard") if self.r.config.tensorboard and self.r.d.main else None
        self.profiler = (
            StepProfiler(self.r.run_dir, self.r.config.profile_steps, self.r.device, self.r.report.info)
            if self.r.config.profile_steps and self.r.d.main
            else None
        )
        self.r.report.start(self.total_epochs)
        with StopSignals() as self.signals, self.r.rt.threads_applied(), self.profiler or contextlib.nullcontext():
            try:
                for index, phase in enumerate(self.r.plan):
                    before = sum(p.epochs for p in self.r.plan[:index])  # epochs of the earlier phases
                    if self.r.progress.epoch >= before + phase.epochs:
                        continue  # finished before the checkpoint
                    if self.run_phase(index, phase, before):
                        break
            finally:
                self.r.report.close()
                if self.r.board is not None:
                    self.r.board.close()
        if self.r.progress.best["epoch"] is None:
            raise UserError(
                f"No epoch of '{self.r.run_dir}' produced a finite model to keep; lower the LR or set --grad-clip."
            )

    def run_phase(self, index: int, phase: Phase, before: int) -> bool:
        """The phase's epochs: train one, then validate and checkpoint it. True: stop the run."""
        self.ps = self.start_phase(index, phase, before)
        progress = self.r.progress
        for _ in range(progress.epoch - before, phase.epochs):
            self.ps.train_loader.batch_sampler.set_epoch(progress.epoch, skip_steps=progress.sums.step)
            tick = time.perf_counter() - progress.sums.seconds
            self.done = progress.sums
            r, ps = self.r, self.ps
            set_train_mode(r.model, phase)
            r.objective.start_epoch(progress.sums.step)
            r.report.start_epoch(f"epoch {progress.epoch + 1}/{self.total_epochs}", self.steps_per_epoch)
            r.report.advance(progress.sums.step)
            guard = Guard(r.config, r.data, progress.epoch, progress.nan_skipped)
            context = EpochContext(r.rt, r.d, guard, r.report, self.after_step)
            with out_of_memory_stops(r.config, r.run_dir, r.d, lambda: self.done, self.save_last, ps.update.optimizer):
                progress.sums = train_one_epoch(ps.objective, ps.train_loader, ps.update, progress.sums, context)
            progress.nan_skipped = guard.skipped
            progress.epoch += 1
            if self.end_epoch(time.perf_counter() - tick):
                return True
        return False

    def start_phase(self, index: int, phase: Phase, before: int) -> PhaseState:
        """Unfreeze the phase's groups; its optimizer and schedule (restored inside a resumed phase); its
        loaders (a head-only phase on a fixed backbone trains on cached features, see `features`)."""
        c, model, state, progress = self.r.config, self.r.model, self.r.state, self.r.progress
        apply_phase(model, self.r.groups, phase)
        extra = [p for term in self.r.terms for p in term.parameters()]
        optimizer = make_optimizer(model, self.r.groups, phase, c, extra=extra)
        # each phase warms up (at most half its length) and decays on its own
        warmup = round(min(c.warmup_epochs, phase.epochs / 2) * self.steps_per_epoch)
        scheduler = warmup_cosine(optimizer, warmup, phase.epochs * self.steps_per_epoch)
        if state is not None and index == state["phase"] and (progress.epoch, progress.sums.step) != (before, 0):
            optimizer.load_state_dict(state["optimizer"])  # resuming inside this phase
            scheduler.load_state_dict(state["scheduler"])
        head_only = (
            c.feature_cache
            and not phase.groups
            and not c.drop_path
            and self.r.objective.mixer is None
            and not self.r.terms
        )  # a term may run the whole model on rows of its own
        train_loader, val_loader = self.r.loaders["train"], self.r.loaders["val"]
        if head_only:
            tick = time.perf_counter()
            train_loader, val_loader = feature_loaders(
                model,
                self.r.data,
                self.r.prep,
                c,
                self.r.rt,
                self.r.report,
                self.r.loaders["train"],
                self.r.task,
                self.r.d,
                self.r.cache_s,
            )
            self.r.cache_s["feature_cache_s"] += time.perf_counter() - tick
            self.r.report.info(
                f"[transferkit] backbone features ready in {time.perf_counter() - tick:.1f} s "
                f"(cache {cache_root(c) / 'features'})"
            )
        self.r.report.info(
            f"[transferkit] phase '{phase.name}': groups {phase.groups or 'none'} of "
            f"{len(self.r.groups)} train, BN {phase.bn}, {count_trainable(model):,} trainable parameters"
            + (", on cached features" if head_only else "")
        )
        objective = self.r.objective
        objective.encode = "features" if head_only else "full" if phase.groups else "frozen"
        objective.move = self.r.rt.batch if head_only else self.r.move
        wrapped = distributed.ddp_wrap(objective, self.r.d, self.r.device)  # what trains in this phase
        update = Update(optimizer, scheduler, c.grad_clip)
        return PhaseState(index, phase, update, train_loader, val_loader, head_only, wrapped, objective.move)

    def save_last(self, where: EpochSums) -> None:
        """last.ckpt at the current position (rank 0 writes it, with every rank's random streams); `where`
        holds the steps done in this epoch."""
        d, p, ps = self.r.d, self.r.progress, self.ps
        rngs = d.gather(get_rng_state())
        if d.main:
            save_checkpoint(
                self.r.run_dir / "last.ckpt",
                {
                    "model": self.r.model.state_dict(),
                    "optimizer": ps.update.optimizer.state_dict(),
                    "scheduler": ps.update.scheduler.state_dict(),
                    "config": self.r.config.to_dict(),
                    "plan": [phase.to_dict() for phase in self.r.plan],
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
                    "terms": [term.state_dict() for term in self.r.terms],
                },
            )
        d.barrier()  # no rank leaves (or is stopped by torchrun) before the file is whole

    def after_step(self, where: EpochSums, step_loss: float) -> None:
        """After each step: log it; inside an epoch, stop on a signal (any rank's) or write a step
        checkpoint when one is due. `self.done` keeps the position (if memory runs out next step)."""
        self.done, epoch, steps = where, self.r.progress.epoch, self.steps_per_epoch
        if self.profiler is not None:
            self.profiler.step()
        if self.r.board is not None:
            self.r.board.step(epoch * steps + where.step, step_loss, self.ps.update.optimizer.param_groups[-1]["lr"])
        if where.step == steps:
            return  # the epoch's end saves and checks for signals
        if self.r.d.sum([self.signals.signum is not None])[0]:
            self.save_last(where)
            raise Preempted(
                self.signals.signum or signal.SIGTERM, self.r.run_dir, f"epoch {epoch + 1}, step {where.step}"
            )
        if self.r.config.save_every_steps and (epoch * steps + where.step) % self.r.config.save_every_steps == 0:
            self.save_last(where)

    def end_epoch(self, seconds: float) -> bool:
        """Validate, log the epoch's row, keep the best (and top-k) bundles, checkpoint; True: stop (a signal
        stops by raising Preempted)."""
        c, d, p, ps, model = self.r.config, self.r.d, self.r.progress, self.ps, self.r.model
        tick = time.perf_counter()
        val = (
            evaluate_loader(
                model.head if ps.head_only else model, ps.val_loader, self.r.eval_loss, self.r.rt, d=d, move=ps.move
            )
            if len(self.r.data.splits["val"])
            else None
        )
        val_logits = val.pop("logits") if val else None
        row = self.epoch_row(val, seconds, time.perf_counter() - tick)
        # best by val accuracy, ties broken by lower val loss (or by target entropy: --select); without a
        # score, the latest. A model with non-finite weights or val loss is never kept.
        score = {"epoch": p.epoch, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
        if self.r.select == "target-entropy":
            score["target_entropy"] = row["target_entropy"]
        scored = val is not None or "target_entropy" in score
        finite = all_finite(model) and (val is None or math.isfinite(val["loss"]))
        improved = finite and (not scored or p.best["epoch"] is None or score_key(score) > score_key(p.best))
        if improved:
            p.best, p.best_val_logits, p.since_best = score, val_logits, 0
            if d.main:
                save_bundle(self.r.run_dir / "best", model, {**self.r.meta, "metrics": {"best": p.best}})
        else:
            p.since_best += 1
        if c.keep_top_k and scored and finite:
            p.top = keep_top(self.r.run_dir, p.top, score, c.keep_top_k, model, self.r.meta, d.main)
        train_means = p.sums.means()
        p.sums = EpochSums()
        self.save_last(p.sums)
        self.r.report.end_epoch(
            f"epoch {p.epoch:>3} {ps.phase.name}: train loss {row['train_loss']:.4f}"
            + "".join(f" {name} {mean:.3f}" for name, mean in train_means.items())
            + (f" | val loss {val['loss']:.4f} acc {val['accuracy']:.3f}" if val else " | no val split")
            + f" | {row['images_per_s']:.1f} img/s{' *' if improved else ''}"
        )
        if d.sum([self.signals.signum is not None])[0]:  # any rank's signal stops all of them
            raise Preempted(self.signals.signum or signal.SIGTERM, self.r.run_dir, f"after epoch {p.epoch}")
        if c.patience and p.since_best >= c.patience:
            self.r.report.info(f"[transferkit] early stop: no better {self.r.select} score for {c.patience} epochs")
            return True
        if self.r.on_epoch is not None and d.sum([bool(self.r.on_epoch(row))])[0]:
            self.r.report.info(f"[transferkit] stopped after epoch {p.epoch}: on_epoch asked to")
            return True
        return False

    def epoch_row(self, val: dict | None, seconds: float, val_seconds: float) -> dict:
        """The epoch's metrics.jsonl row (rank 0 writes it; TensorBoard gets it too): `seconds` training,
        `val_seconds` validating."""
        p, sums = self.r.progress, self.r.progress.sums
        row = {
            "epoch": p.epoch,
            "phase": self.ps.phase.name,
            "groups": trainable_groups(self.r.model, self.r.groups),
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
        for term in self.r.terms:  # their own measures (adaptation: domain accuracy, target accuracy)
            row.update(term.epoch_metrics(self.r.model))
        if self.r.device.type == "cuda":  # the epoch's peak, training and validation
            row["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.r.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.r.device)
        if self.r.d.main:
            with (self.r.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if self.r.board is not None:
            self.r.board.epoch(row)
        return row
