"""The training loop: setup -> phases of epochs (train, validate, keep the best) -> test -> save.

No callbacks and no trainer class: the loop below is the whole story. The run directory
holds config.yaml, split.json, classes.json, plan.json, metrics.jsonl (one row per epoch),
metrics.json (final), last.ckpt (state to continue from, see `checkpoint`), best/ (the
bundle), top/ (with keep_top_k) and skipped.txt (files left out, see `check`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit import __version__
from transferkit.bundle import load_bundle, save_bundle
from transferkit.check import write_skipped
from transferkit.checkpoint import get_rng_state, load_resume, resumed_plan, save_checkpoint, set_rng_state
from transferkit.config import TrainConfig
from transferkit.data import Data, ImageDataset, load_data
from transferkit.errors import UserError
from transferkit.features import FeatureLoader, cached_features
from transferkit.fuse import fold_batchnorm
from transferkit.imagecache import cached_images
from transferkit.metrics import classification_metrics
from transferkit.model import build_classifier, layer_groups
from transferkit.lrfind import RULE as LR_RULE
from transferkit.lrfind import lr_find
from transferkit.optim import make_optimizer, warmup_cosine
from transferkit.preempt import Preempted, StopSignals
from transferkit.progress import Reporter
from transferkit import distributed
from transferkit.distributed import Dist, StepBatches, loss_scale
from transferkit.board import Board
from transferkit.regularize import L2SP
from transferkit.report import build_report, confusion_png, save_predictions
from transferkit.precision import AGREEMENT, Workload, agreement_counts
from transferkit.runtime import Runtime, cache_root, configure_cuda, default_workers, pick_device
from transferkit.runtime import resolve as resolve_runtime
from transferkit.sampling import EpochSampler
from transferkit.strategy import Phase, apply_phase, count_trainable, make_plan, set_train_mode, trainable_groups
from transferkit.transforms import eval_transform, train_transform


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


def train(config: TrainConfig | None = None, *, report: Reporter | None = None, resume: str | Path | None = None,
          **overrides) -> Run:
    """Fine-tune a pretrained backbone on `data`; see TrainConfig for every option.

    Example: `transferkit.train(data="builtin:faces", strategy="linear-probe", epochs=5)`.
    `report` replaces the default progress display (compare passes a silent one).
    `resume="runs/NAME"` continues that run from its last.ckpt with its own config, split and plan;
    `overrides` may then change only what `checkpoint.RESUMABLE_CHANGES` allows (e.g. epochs).
    Raises `Preempted` after saving last.ckpt when SIGTERM or SIGINT arrives.
    """
    state, changes = None, {}
    if resume is not None:
        config, state, changes = load_resume(Path(resume), overrides)
    else:
        config = config.replace(**overrides) if config is not None else TrainConfig.from_dict(overrides)
    started = time.perf_counter()
    d, rank_device = distributed.setup(config.device)  # one process, or a rank of torchrun's group
    report = report or Reporter(config.quiet, silent=not d.main)

    # --- setup: data, model, plan, run directory -------------------------------------------
    seed_everything(config.seed)
    set_deterministic(config.deterministic)
    device = rank_device or pick_device(config.device)
    if state is not None:  # the run's own split, exactly (few-shot selection included)
        data = load_data(config.data, split_file=str(Path(resume) / "split.json"))
    else:
        data = load_data(config.data, seed=config.seed, val_fraction=config.val_fraction,
                         test_fraction=config.test_fraction, shots=config.shots, split_file=config.split_file,
                         bad_files=config.bad_files)
    model, record, prep = build_classifier(
        config.model, "none" if config.strategy == "scratch" else config.weights, len(data.classes),
        in_chans=config.in_chans, img_size=config.img_size or data.default_img_size,
        head=config.head, head_hidden=config.head_hidden, head_dropout=config.head_dropout,
        drop_path=config.drop_path, trust=config.trust_checkpoint)
    workers = config.workers if config.workers is not None \
        else default_workers(data.arrays is not None, device.type == "cuda")
    groups = layer_groups(model.backbone)
    if state is not None:
        run_dir = Path(resume)
        plan = resumed_plan(state, config, len(groups))
        if changes and d.main:
            config.save(run_dir / "config.yaml")
            (run_dir / "plan.json").write_text(json.dumps([p.to_dict() for p in plan], indent=1))
    else:
        run_dir = make_run_dir(Path(config.runs_dir), config.name or default_name(config),
                               auto=config.name is None, overwrite=config.overwrite) if d.main else None
        run_dir = Path(d.gather(str(run_dir))[0])  # rank 0 picked it
        config = config.replace(img_size=prep.img_size, workers=workers, name=run_dir.name)
        if config.lr_scaling != "none" and config.lr != "auto":  # config.yaml keeps the LR actually used
            scaled = distributed.scaled_lr(config.lr, config.batch_size, config.lr_scaling, config.lr_base_batch)
            report.info(f"[transferkit] lr {config.lr:g} scaled ({config.lr_scaling}, batch {config.batch_size} "
                        f"against {config.lr_base_batch}) to {scaled:g}")
            config = config.replace(lr=scaled, lr_scaling="none")
        plan = make_plan(config, len(groups))
    distributed.check_batch(config.batch_size, config.accumulate, d, len(data.splits["train"]))
    rt = runtime_for(config, model, prep, plan, device, workers, d, report)
    if config.sync_bn and d.on:  # BatchNorm statistics over the global batch (timm's version keeps act layers)
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    rt.prepare(model)
    if rt.compile:  # the whole model's forward; the state_dict keeps its keys
        model.compile()
    if d.main and state is None:
        config.save(run_dir / "config.yaml")
        data.save_split(run_dir / "split.json")
        (run_dir / "classes.json").write_text(json.dumps(data.classes))
        (run_dir / "plan.json").write_text(json.dumps([p.to_dict() for p in plan], indent=1))
        if data.skipped:
            write_skipped(run_dir / "skipped.txt", data.skipped)
    setting = {**rt.to_dict(), "processes": d.world, "global_batch": config.batch_size,
               "accumulate": config.accumulate, "micro_batch": config.batch_size // (config.accumulate * d.world),
               "sync_bn": config.sync_bn and d.on}
    if d.main:  # this start's, on resume too
        (run_dir / "runtime.json").write_text(json.dumps(setting, indent=1))
    report.info(
        f"[transferkit] {run_dir}: {config.model} ({record['weights']}), {config.strategy}, "
        f"{len(data.classes)} classes, train/val/test = "
        f"{'/'.join(str(len(data.splits[s])) for s in ('train', 'val', 'test'))} ({data.how}), "
        f"{prep.img_size}px, {len(groups)} layer groups, {device} {rt.describe_precision()}"
        + (f", {workers} loader workers" if workers else "") + (", compiled" if rt.compile else "")
        + (f"; {d.world} processes, global batch {config.batch_size} = {setting['micro_batch']} x {d.world} x "
           f"{config.accumulate} accumulated" if d.on or config.accumulate > 1 else ""))
    if data.skipped:
        report.info(f"[transferkit] warning: skipped {len(data.skipped)} file(s), e.g. {data.skipped[0][0]}: "
                    f"{data.skipped[0][1]}; the full list is in {run_dir / 'skipped.txt'}")

    counts = data.counts("train")
    if max(counts.values()) >= 10 * min(counts.values()) and config.class_weights == "none" \
            and config.sampler == "shuffle":
        report.info(f"[transferkit] warning: classes are imbalanced (largest {max(counts.values())}, smallest "
                    f"{min(counts.values())} training images); consider --class-weights auto or --sampler balanced")
    # phases that run the backbone read decoded images from a memory map (see `imagecache`)
    decoded, cache_s = {}, {"image_cache_s": 0.0, "feature_cache_s": 0.0}  # time to build or open caches
    if config.image_cache and data.arrays is None and any(p.groups for p in plan):
        tick = time.perf_counter()
        decoded = {s: cached_images(data, s, prep, config, report, d) for s in ("train", "val") if data.splits[s]}
        cache_s["image_cache_s"] = time.perf_counter() - tick
        report.info(f"[transferkit] decoded-image cache ready in {cache_s['image_cache_s']:.1f} s "
                    f"(cache {cache_root(config) / 'images'})")
    normalize = not rt.normalizes_on_device  # in the workers, or uint8 pixels to the GPU (see Runtime)
    loaders = {
        "train": make_loader(data, "train", train_transform(prep, config.augment, normalize), config,
                             shuffle=True, images=decoded.get("train"), min_side=prep.resize, d=d),
        "val": make_loader(data, "val", eval_transform(prep, "val" in decoded, normalize), config,
                           images=decoded.get("val"), min_side=prep.resize, d=d),
        "test": make_loader(data, "test", eval_transform(prep, normalize=normalize), config, min_side=prep.resize,
                            d=d),
    }
    weight = None
    if config.class_weights == "auto":  # inverse frequency, mean weight 1 over the training images
        n = torch.tensor([counts[c] for c in data.classes], dtype=torch.float32)
        weight = (n.sum() / (len(n) * n)).to(device)
    loss_fn = hard_loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    mixer = None
    if config.mixup or config.cutmix:  # soft targets; timm's Mixup applies the label smoothing itself
        from timm.data import Mixup

        mixer = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                      label_smoothing=config.label_smoothing, num_classes=len(data.classes))
        loss_fn = _soft_target_cross_entropy
    l2sp = L2SP(model.backbone, config.l2sp) if config.l2sp else None
    if config.lr == "auto" and state is None:  # rank 0 runs the range test on its batches, all use its LR
        found = None
        if d.main:
            probe = make_plan(config.replace(lr=1e-3, lr_min=None), len(groups))[0]
            found = lr_find(model, groups, probe, loaders["train"], hard_loss, config.replace(lr=1e-3), rt)
            found.plot(run_dir / "lr_find.png")
        config = config.replace(lr=d.gather(found.suggestion if found else None)[0])
        plan = make_plan(config, len(groups))
        if d.main:
            config.save(run_dir / "config.yaml")
            (run_dir / "plan.json").write_text(json.dumps([p.to_dict() for p in plan], indent=1))
            report.info(f"[transferkit] lr auto: {found.suggestion:.2e} ({LR_RULE}; {len(found.lrs)} steps, "
                        f"plot {run_dir / 'lr_find.png'})")
    eval_loss = nn.CrossEntropyLoss()  # val/test loss without smoothing, comparable across configs
    meta = {"transferkit_version": __version__, "architecture": record, "classes": data.classes,
            "preprocessing": prep.to_dict(), "strategy": {"name": config.strategy, "plan": [p.to_dict() for p in plan]},
            "data": {"spec": config.data, "how": data.how}}

    # --- epochs ----------------------------------------------------------------------------
    # position: `epoch` epochs done, plus `sums.step` batches of the next one (a mid-epoch checkpoint)
    best = {"epoch": None, "val_accuracy": -1.0, "val_loss": math.inf}
    best_val_logits = None  # the best epoch's validation logits (the report's calibration reuses them)
    epoch, since_best, stop, top, nan_skipped, sums = 0, 0, False, [], 0, EpochSums()
    if state is None:
        if d.main:
            (run_dir / "metrics.jsonl").write_text("")
    else:  # rows written after the checkpoint belong to the lost part of the run
        try:
            model.load_state_dict(state["model"])  # after L2SP took its pretrained reference
        except RuntimeError as err:
            raise UserError(f"'{run_dir / 'last.ckpt'}' does not fit this run's model: "
                            f"{str(err).splitlines()[0]}") from None
        epoch, best, since_best, top = state["epoch"], state["best"], state["since_best"], state["top"]
        nan_skipped, sums = state["nan_skipped"], EpochSums(**state["sums"])
        if d.main:
            rows = (run_dir / "metrics.jsonl").read_text().splitlines()
            (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows[:epoch]))
            prune_top(run_dir, top)
        ranks = state.get("rng_ranks") or []  # each rank's own streams when the world size is the same
        set_rng_state(ranks[d.rank] if len(ranks) == d.world else state["rng"])
        report.info(f"[transferkit] resuming {run_dir} after epoch {epoch}"
                    + (f", step {sums.step}" if sums.step else "")
                    + "".join(f"; {k} changed to {v!r}" for k, v in changes.items()))
    total_epochs = sum(p.epochs for p in plan)
    steps_per_epoch = len(loaders["train"].batch_sampler.step_sizes())  # optimizer steps
    board = Board(run_dir / "tensorboard") if config.tensorboard and d.main else None
    report.start(total_epochs)
    with StopSignals() as signals, rt.threads_applied():
        try:
            for phase_index, phase in enumerate(plan):
                before = sum(p.epochs for p in plan[:phase_index])  # epochs of the earlier phases
                if epoch >= before + phase.epochs:
                    continue  # finished before the checkpoint
                apply_phase(model, groups, phase)
                optimizer = make_optimizer(model, groups, phase, config)
                # each phase warms up (at most half its length) and decays on its own
                warmup = round(min(config.warmup_epochs, phase.epochs / 2) * steps_per_epoch)
                scheduler = warmup_cosine(optimizer, warmup, phase.epochs * steps_per_epoch)
                if state is not None and phase_index == state["phase"] and (epoch, sums.step) != (before, 0):
                    optimizer.load_state_dict(state["optimizer"])  # resuming inside this phase
                    scheduler.load_state_dict(state["scheduler"])
                # a head-only phase on a fixed backbone trains on cached features (see `features`)
                head_only = config.feature_cache and not phase.groups and not config.drop_path and mixer is None
                train_loader, val_loader = loaders["train"], loaders["val"]
                if head_only:
                    tick = time.perf_counter()
                    train_loader, val_loader = feature_loaders(model, data, prep, config, rt, report,
                                                               loaders["train"], d)
                    cache_s["feature_cache_s"] += time.perf_counter() - tick
                    report.info(f"[transferkit] backbone features ready in {time.perf_counter() - tick:.1f} s "
                                f"(cache {cache_root(config) / 'features'})")
                report.info(f"[transferkit] phase '{phase.name}': groups {phase.groups or 'none'} of "
                            f"{len(groups)} train, BN {phase.bn}, {count_trainable(model):,} trainable parameters"
                            + (", on cached features" if head_only else ""))

                mode = "features" if head_only else "full" if phase.groups else "frozen"
                net = distributed.ddp_wrap(StepModel(model, mode), d, device)  # what trains in this phase

                def save_last(where: EpochSums) -> None:
                    """last.ckpt at the current position (rank 0 writes it, with every rank's random
                    streams); `where` holds the steps done in this epoch."""
                    rngs = d.gather(get_rng_state())
                    if d.main:
                        save_checkpoint(run_dir / "last.ckpt", {
                            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "config": config.to_dict(),
                            "plan": [p.to_dict() for p in plan], "phase": phase_index, "epoch": epoch,
                            "step": where.step, "sums": asdict(where), "best": best, "since_best": since_best,
                            "top": top, "nan_skipped": nan_skipped, "rng": rngs[0],
                            "rng_ranks": rngs if d.on else []})
                    d.barrier()  # no rank leaves (or is stopped by torchrun) before the file is whole

                done = [sums]  # the position after the last whole step (kept if memory runs out)

                def after_step(where: EpochSums, step_loss: float) -> None:
                    """After each step: log it; inside an epoch, stop on a signal (any rank's) or write a step
                    checkpoint when one is due."""
                    done[0] = where
                    if board is not None:
                        board.step(epoch * steps_per_epoch + where.step, step_loss, optimizer.param_groups[-1]["lr"])
                    if where.step == steps_per_epoch:
                        return  # the epoch's end saves and checks for signals
                    if d.sum([signals.signum is not None])[0]:
                        save_last(where)
                        raise Preempted(signals.signum or signal.SIGTERM, run_dir,
                                        f"epoch {epoch + 1}, step {where.step}")
                    due = (epoch * steps_per_epoch + where.step) % max(config.save_every_steps, 1) == 0
                    if config.save_every_steps and due:
                        save_last(where)

                for _ in range(epoch - before, phase.epochs):
                    train_loader.batch_sampler.set_epoch(epoch, skip_steps=sums.step)
                    tick = time.perf_counter() - sums.seconds
                    done[0] = sums
                    with out_of_memory_stops(config, run_dir, d, done, save_last, optimizer):
                        sums, nan_skipped = train_one_epoch(
                            net, model, train_loader, optimizer, scheduler, loss_fn, phase, rt, report,
                            f"epoch {epoch + 1}/{total_epochs}", sums, Guard(config, data, epoch, nan_skipped),
                            mixer, l2sp, after_step, d)
                    epoch += 1
                    seconds = time.perf_counter() - tick
                    train_loss, train_acc = sums.loss_sum / max(sums.seen, 1), sums.correct / max(sums.seen, 1)
                    val = (evaluate_loader(model.head if head_only else model, val_loader, eval_loss, rt, d=d)
                           if len(data.splits["val"]) else None)
                    val_logits = val.pop("logits") if val else None
                    row = {"epoch": epoch, "phase": phase.name, "groups": trainable_groups(model, groups),
                           "train_loss": train_loss, "train_accuracy": train_acc,
                           "val_loss": val["loss"] if val else None, "val_accuracy": val["accuracy"] if val else None,
                           "lr": optimizer.param_groups[0]["lr"], "images_per_s": sums.seen / seconds,
                           "epoch_s": seconds, "data_wait": sums.data_s / max(sums.seconds, 1e-9)}
                    if device.type == "cuda":  # the epoch's peak, training and validation
                        row["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                        torch.cuda.reset_peak_memory_stats(device)
                    if d.main:
                        with (run_dir / "metrics.jsonl").open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
                    if board is not None:
                        board.epoch(row)
                    # best by val accuracy, ties broken by lower val loss; without a val split, the latest.
                    # A model with non-finite weights or val loss is never kept.
                    score = {"epoch": epoch, "val_accuracy": val["accuracy"] if val else None,
                             "val_loss": val["loss"] if val else None}
                    finite = all_finite(model) and (val is None or math.isfinite(val["loss"]))
                    improved = finite and (val is None or _key(score) > _key(best))
                    if improved:
                        best, best_val_logits = score, val_logits
                        if d.main:
                            save_bundle(run_dir / "best", model, {**meta, "metrics": {"best": best}})
                        since_best = 0
                    else:
                        since_best += 1
                    if config.keep_top_k and val is not None and finite:
                        top = keep_top(run_dir, top, score, config.keep_top_k, model, meta, d.main)
                    sums = EpochSums()
                    save_last(sums)
                    report.end_epoch(
                        f"epoch {epoch:>3} {phase.name}: train loss {train_loss:.4f} acc {train_acc:.3f}"
                        + (f" | val loss {val['loss']:.4f} acc {val['accuracy']:.3f}" if val else " | no val split")
                        + f" | {row['images_per_s']:.1f} img/s{' *' if improved else ''}")
                    if d.sum([signals.signum is not None])[0]:  # any rank's signal stops all of them
                        raise Preempted(signals.signum or signal.SIGTERM, run_dir, f"after epoch {epoch}")
                    if config.patience and since_best >= config.patience:
                        report.info(f"[transferkit] early stop: no better val score for {config.patience} epochs")
                        stop = True
                        break
                if stop:
                    break
        finally:
            report.close()
            if board is not None:
                board.close()
    if best["epoch"] is None:
        raise UserError(f"No epoch of '{run_dir}' produced a finite model to keep; lower the LR or set --grad-clip.")

    # --- test the best checkpoint, exactly as shipped ---------------------------------------
    d.barrier()  # rank 0 has written best/
    shipped, _ = load_bundle(run_dir / "best")
    rt.prepare(shipped)
    test = test_logits = None
    if len(data.splits["test"]):
        test = evaluate_loader(shipped, loaders["test"], eval_loss, rt, data.classes, d, fold=True)
        test_logits = test.pop("logits")
    checked = serving_check(shipped, [loaders["val"], loaders["test"]], rt, d, report)
    metrics = {"test": test, "best": best, "epochs_run": epoch, "trainable_params": count_trainable(model),
               "nan_skipped_steps": nan_skipped, "skipped_files": len(data.skipped), **cache_s, "runtime": setting,
               "precision_check": checked, "wall_time_s": time.perf_counter() - started}
    if d.main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        save_predictions(run_dir, {"test": test_logits, "val": best_val_logits})
        save_bundle(run_dir / "best", shipped, {**meta, "metrics": {"best": best, "test": _headline(test)},
                                                "precision": checked})
        if board is not None and test is not None:
            board = Board(run_dir / "tensorboard")
            board.confusion(confusion_png(test, data.classes), epoch)
            board.close()
        report.info(f"[transferkit] best epoch {best['epoch']}; test "
                    + (f"accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} on {test['n']} images; "
                       "recall " + ", ".join(f"{c} {m['recall']:.2f}" for c, m in list(test["per_class"].items())[:20])
                       if test else "skipped (no test split)") + f"; saved {run_dir / 'best'}")
        if config.html_report:  # the run is complete, saved and told: a failing report only warns
            try:
                report.info(f"[transferkit] report: {build_report(run_dir, str(device), data)}")
            except (UserError, OSError) as err:
                report.info(f"[transferkit] warning: no report.html ({err}); retry with `transferkit report {run_dir}`")
    d.barrier()
    return Run(dir=run_dir, config=config, metrics=metrics)


@contextlib.contextmanager
def out_of_memory_stops(config: TrainConfig, run_dir: Path, d: Dist, done: list, save_last, optimizer):
    """Turn the GPU running out of memory into a UserError that says what to change. One process saves
    last.ckpt at `done[0]` (the last whole step) first, so `--resume` with more accumulation goes on."""
    try:
        yield
        return
    except torch.OutOfMemoryError as err:  # leave the except block: its traceback holds the step's tensors
        first_line = str(err).splitlines()[0]
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    micro = config.batch_size // (config.accumulate * d.world)
    saved = not d.on  # ranks cannot agree on a position once one has failed
    if saved:
        save_last(done[0])
    where = (f"saved {run_dir / 'last.ckpt'} at step {done[0].step} of this epoch; resume with the same global "
             f"batch and half the memory per step: `transferkit train --resume {run_dir} --accumulate "
             f"{config.accumulate * 2}`" if saved else f"resume {run_dir} from its last checkpoint with "
             f"--accumulate {config.accumulate * 2}")
    raise UserError(f"Out of GPU memory training micro-batches of {micro} images ({first_line}). {where}; or start "
                    f"a new run with a smaller --batch-size (e.g. {max(1, config.batch_size // 2)}).") from None


def runtime_for(config: TrainConfig, model, prep, plan: list[Phase], device, workers: int, d: Dist,
                report: Reporter) -> Runtime:
    """The run's Runtime; precision auto may time the model on rank 0 (see `precision`), whose choice
    every rank takes."""
    micro = max(2, config.batch_size // (config.accumulate * d.world))
    workload = Workload(model, f"{config.model} {config.in_chans}ch", (micro, config.in_chans, prep.img_size,
                                                                    prep.img_size), config.channels_last)
    rt = resolve_runtime(config, device, workers, workload if d.main else None,
                         trains_backbone=any(p.groups for p in plan), say=report.info)
    precision, reasons = d.gather((rt.precision, rt.reasons))[0]
    report.info(f"[transferkit] precision {config.precision}: train {precision['train']} ({reasons['train']}); "
                f"inference {precision['infer']} ({reasons['infer']})")
    return replace(rt, precision=precision, reasons=reasons, normalize=prep.mean_std)


def serving_check(model, loaders, rt: Runtime, d: Dist, report: Reporter) -> dict:
    """The run's precisions, and where inference ran in bf16, the share of val + test images whose top-1 is
    the same in bf16 as in fp32 (saved in the bundle: auto serves bf16 only above precision.AGREEMENT)."""
    out = dict(rt.precision)
    if rt.precision["infer"] != "bf16":
        return out
    same, total = d.sum(list(agreement_counts(model, (images for loader in loaders for images, _, _ in loader),
                                              rt.batch)))
    if total:
        out.update(bf16_top1_agreement=same / total, images=int(total))
        report.info(f"[transferkit] bf16 top-1 agrees with fp32 on {same / total:.1%} of {int(total)} val+test "
                    f"images: predict serves in {'bf16' if same / total >= AGREEMENT else 'fp32'} where bf16 is faster")
    return out


@dataclass
class EpochSums:
    """Running totals of the epoch in progress; saved in mid-epoch checkpoints."""

    step: int = 0
    """Batches done."""
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    data_s: float = 0.0
    """Of `seconds`, the time spent waiting for the loader's next batch (every step waits for its loss)."""


class Guard:
    """The NaN/Inf policy for one epoch: stop with the batch's files named, or skip up to a limit."""

    def __init__(self, config: TrainConfig, data: Data, epoch: int, skipped: int):
        self.config, self.data, self.epoch, self.skipped = config, data, epoch, skipped

    def check(self, what: str, value: float, step: int, indices: torch.Tensor) -> bool:
        """True when `value` is finite; False to skip the step; raises UserError to stop."""
        if math.isfinite(value):
            return True
        files = [self.data.splits["train"][i][0] for i in indices.tolist()]
        where = (f"{what} is {value} at epoch {self.epoch + 1}, step {step} (batch of {len(files)}: "
                 f"{', '.join(files[:8])}{', ...' if len(files) > 8 else ''})")
        if self.config.nan_policy == "skip" and self.skipped < self.config.nan_skip_limit:
            self.skipped += 1
            return False
        limit = (f" after skipping {self.skipped} such steps (nan_skip_limit {self.config.nan_skip_limit})"
                 if self.config.nan_policy == "skip" else "")
        raise UserError(f"Training stopped{limit}: {where}. Lower --lr, set --grad-clip 1.0, check those images, "
                        "or pass --nan-policy skip.")


class StepModel(nn.Module):
    """What a training step runs, as one module for DDP to wrap: the head on cached features
    ("features"), the head on a frozen backbone's features without a backward graph below it
    ("frozen"), or the whole model ("full")."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "full":
            return self.model(x)
        if self.mode == "frozen":
            with torch.no_grad():
                x = self.model.backbone(x)
        return self.model.head(x)


def train_one_epoch(net: nn.Module, model: nn.Module, loader, optimizer, scheduler, loss_fn, phase: Phase,
                    rt: Runtime, report: Reporter, description: str, sums: EpochSums, guard: Guard, mixer=None,
                    l2sp: L2SP | None = None, after_step=None, d: Dist = Dist()) -> tuple[EpochSums, int]:
    """One pass over the training data (from optimizer step `sums.step` on); returns the epoch's totals
    (over all ranks) and the run's count of skipped non-finite steps. `net` is the StepModel (DDP-wrapped
    with several processes); `loader.batch_sampler` is the StepBatches that groups its micro-batches into
    steps. `after_step(sums, step_loss)` runs after every step."""
    set_train_mode(model, phase)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sizes, accumulate = loader.batch_sampler.step_sizes(), loader.batch_sampler.accumulate
    tick = time.perf_counter() - sums.seconds
    report.start_epoch(description, len(sizes))
    report.advance(sums.step)
    micro, step_ok, waited = 0, True, [sums.data_s]
    for images, labels, indices in timed(loader, waited):
        images, labels = rt.batch(images), labels.to(rt.device, non_blocking=True)
        targets = labels
        if mixer is not None and len(labels) % 2 == 0:  # timm's Mixup pairs images: needs an even batch
            images, targets = mixer(images, labels)
        elif mixer is not None:
            targets = torch.nn.functional.one_hot(labels, mixer.num_classes).float()
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
            step_ok, start = True, (sums.loss_sum, sums.seen)
        last = micro == accumulate - 1
        step = sums.step + 1
        # DDP averages gradients at the step's last micro-batch only
        with contextlib.nullcontext() if last or not d.on else net.no_sync():
            with rt.autocast():
                logits = net(images)
                loss = loss_fn(logits.float(), targets)
                if l2sp is not None:
                    loss = loss + l2sp.penalty(model.backbone)
            value = loss.item()
            finite = math.isfinite(value)
            # one all-reduce: the micro-batch's loss, images, hits and non-finite count over the ranks
            loss_sum, seen, correct, bad = d.sum([value * len(labels) if finite else 0.0, len(labels),
                                                  (logits.argmax(1) == labels).sum().item(), 0 if finite else 1])
            step_ok = step_ok and guard.check("loss", math.nan if bad else loss_sum / seen, step, indices)
            if step_ok:
                (loss * loss_scale(len(labels), sizes[sums.step], d)).backward()
        micro += 1
        sums = replace(sums, loss_sum=sums.loss_sum + loss_sum, correct=sums.correct + int(correct),
                       seen=sums.seen + int(seen))
        if not last:
            continue
        if step_ok:
            norm = torch.nn.utils.clip_grad_norm_(params, guard.config.grad_clip or math.inf)
            if guard.check("gradient norm", norm.item(), step, indices):
                optimizer.step()
        scheduler.step()
        micro = 0
        sums = replace(sums, step=step, seconds=time.perf_counter() - tick, data_s=waited[0])
        report.batch(sums.loss_sum / sums.seen, sums.correct / sums.seen, sums.seen / sums.seconds)
        if after_step is not None:
            after_step(sums, (sums.loss_sum - start[0]) / max(sums.seen - start[1], 1))
    return sums, guard.skipped


def timed(loader, waited: list[float]):
    """Iterate `loader`, adding the seconds spent waiting for each item to `waited[0]`."""
    items = iter(loader)
    while True:
        tick = time.perf_counter()
        item = next(items, None)
        waited[0] += time.perf_counter() - tick
        if item is None:
            return
        yield item


@torch.inference_mode()
def evaluate_loader(model, loader, loss_fn, rt: Runtime, classes: list[str] | None = None, d: Dist = Dist(),
                    fold: bool = False) -> dict:
    """Loss and accuracy on a loader; with `classes`, the full metrics (F1, per class, confusion); "logits":
    (n, classes) in the split's order (for the report; pop it before writing JSON). With several processes
    each evaluates its shard and the results are gathered: the same on every rank. `fold`: run a copy with
    BatchNorm folded into the convolutions (measured 1.4-1.8x faster; for a model in eval mode for good)."""
    model.eval()
    net, loss_sum, parts = None, 0.0, []
    for images, labels, index in loader:
        images, labels = rt.batch(images), labels.to(rt.device, non_blocking=True)
        if net is None:
            net = fold_batchnorm(model, images[:2]) if fold else model
        with rt.autocast("infer"):
            logits = net(images).float()
        loss_sum += loss_fn(logits, labels).item() * len(labels)
        parts.append((logits.cpu().numpy(), labels.cpu().numpy(), np.asarray(index)))
    ranks = d.gather((loss_sum, parts))
    gathered = [part for _, rank_parts in ranks for part in rank_parts]
    loss_total = sum(rank_sum for rank_sum, _ in ranks)
    order = np.argsort(np.concatenate([index for _, _, index in gathered]), kind="stable")
    logits = np.concatenate([lg for lg, _, _ in gathered])[order]
    y_true = np.concatenate([lb for _, lb, _ in gathered]).astype(np.int64)[order]
    y_pred = logits.argmax(1)
    out = {"loss": loss_total / len(y_true), "accuracy": float((y_pred == y_true).mean())}
    if classes is not None:
        out.update(classification_metrics(y_true, y_pred, classes))
    return {**out, "logits": logits}


def make_loader(data: Data, split: str, transform, config: TrainConfig, shuffle: bool = False,
                images: np.ndarray | None = None, min_side: int | None = None, d: Dist = Dist()):
    """Training (`shuffle`) loaders yield this rank's micro-batches from a StepBatches over an
    EpochSampler: call `loader.batch_sampler.set_epoch(e)` before each epoch. Eval loaders read
    this rank's shard of the split in order. `images`: the split's decoded-image cache, read
    instead of the files; `min_side`: see open_image."""
    dataset = ImageDataset(data, split, transform, config.in_chans, images, min_side)
    common = dict(num_workers=config.workers, generator=torch.Generator().manual_seed(config.seed),
                  pin_memory=torch.cuda.is_available(), persistent_workers=config.workers > 0,
                  worker_init_fn=_init_worker)
    if not shuffle:
        return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=d.shard(len(dataset)),
                                           **common)
    weights = None
    if config.sampler == "balanced":
        counts = data.counts(split)
        weights = [1.0 / counts[label] for _, label in dataset.samples]
    sampler = EpochSampler(len(dataset), config.seed, shuffle=True, weights=weights)
    return torch.utils.data.DataLoader(dataset, batch_sampler=StepBatches(sampler, config.batch_size, d,
                                                                          config.accumulate), **common)


def _soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


def feature_loaders(model, data: Data, prep, config: TrainConfig, rt: Runtime, report, image_loader,
                    d: Dist = Dist()):
    """(train, val) loaders over cached backbone features, in the image loader's batch order; the ranks
    extract their shares of the features together."""
    labels = {s: [data.classes.index(label) for _, label in data.splits[s]] for s in ("train", "val")}
    plain, normalize = {"eval": prep.to_dict()}, not rt.normalizes_on_device
    if config.feature_views:
        transform = train_transform(prep, config.augment, normalize)
        transform_id = {"train": prep.to_dict(), "augment": config.augment}
    else:
        transform, transform_id = eval_transform(prep, normalize=normalize), plain
    train = FeatureLoader(cached_features(model.backbone, data, "train", transform, transform_id, config, rt,
                                          report, config.feature_views, prep.resize, d),
                          labels["train"], image_loader.batch_sampler)
    val = None
    if labels["val"]:
        shard = d.shard(len(labels["val"]))
        val = FeatureLoader(cached_features(model.backbone, data, "val", eval_transform(prep, normalize=normalize),
                                            plain, config, rt, report, min_side=prep.resize, d=d), labels["val"],
                            [shard[i : i + config.batch_size] for i in range(0, len(shard), config.batch_size)])
    return train, val


def _key(score: dict) -> tuple:
    """Ordering of validation scores: higher accuracy, then lower loss."""
    return score["val_accuracy"], -score["val_loss"]


def all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def keep_top(run_dir: Path, top: list[dict], score: dict, k: int, model, meta: dict, write: bool = True) -> list[dict]:
    """Keep the k best epochs as bundles top/epoch-NNN; returns the new ranking (best first).
    `write` False (ranks other than 0) only ranks."""
    ranked = sorted([*top, score], key=_key, reverse=True)
    if not write:
        return ranked[:k]
    if score in ranked[:k]:
        save_bundle(run_dir / "top" / f"epoch-{score['epoch']:03d}", model, {**meta, "metrics": {"best": score}})
    prune_top(run_dir, ranked[:k])
    return ranked[:k]


def prune_top(run_dir: Path, top: list[dict]) -> None:
    """Delete top/ bundles not in the ranking (pushed out, or written after the checkpoint resumed from)."""
    keep = {f"epoch-{s['epoch']:03d}" for s in top}
    for path in sorted((run_dir / "top").glob("epoch-*")):
        if path.name not in keep:
            shutil.rmtree(path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """torch.use_deterministic_algorithms, and the cuBLAS workspace setting it needs on CUDA."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    configure_cuda(deterministic=on)  # flags only: harmless without CUDA
    torch.use_deterministic_algorithms(on)


def _init_worker(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops cleanly (see preempt)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_name(config: TrainConfig) -> str:
    spec = config.data.rstrip("/")
    stem = spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec.split(":")[-1]).stem or "data"
    return f"{stem}-{config.strategy}"


def make_run_dir(root: Path, name: str, auto: bool, overwrite: bool) -> Path:
    """root/name; an auto-derived name that exists gets a -2, -3... suffix, a chosen one is refused."""
    run_dir = root / name
    if run_dir.exists() and overwrite:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--overwrite would delete '{run_dir}', which is not a transferkit run directory.")
        shutil.rmtree(run_dir)
    if run_dir.exists():
        if auto:
            n = 2
            while (root / f"{name}-{n}").exists():
                n += 1
            run_dir = root / f"{name}-{n}"
        else:
            raise UserError(f"Run directory '{run_dir}' already exists. Pick another --name, or pass "
                            "--overwrite to replace it.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _headline(test: dict | None) -> dict | None:
    return None if test is None else {k: test[k] for k in ("accuracy", "macro_f1", "n", "loss")}
