"""The training loop: setup -> phases of epochs (train, validate, keep the best) -> test -> save.

No callbacks and no trainer class: the loop below is the whole story. The run directory
holds config.yaml, split.json, classes.json, plan.json, metrics.jsonl (one row per epoch),
metrics.json (final), last.ckpt (state to continue from, see `checkpoint`), best/ (the
bundle), top/ (with keep_top_k) and skipped.txt (files left out, see `check`).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from transferkit.core import distributed
from transferkit.core.config import TrainConfig
from transferkit.core.distributed import Dist
from transferkit.core.errors import UserError
from transferkit.core.machine import seed_everything, set_deterministic
from transferkit.core.progress import Reporter
from transferkit.core.version import __version__
from transferkit.data.check import write_skipped
from transferkit.data.imagecache import cached_images
from transferkit.data.loaders import make_loader
from transferkit.data.sources import Data, load_data
from transferkit.data.transforms import eval_transform, train_transform
from transferkit.deploy.bundle import load_bundle, save_bundle
from transferkit.evaluation.passes import evaluate_loader
from transferkit.evaluation.report import build_report, confusion_png, save_predictions
from transferkit.models.classifier import build_classifier, layer_groups
from transferkit.models.features import FeatureLoader, cached_features
from transferkit.models.runtime import Runtime
from transferkit.core.machine import cache_root, default_workers, pick_device
from transferkit.training.board import Board
from transferkit.training.checkpoint import (
    get_rng_state,
    load_resume,
    resumed_plan,
    save_checkpoint,
    set_rng_state,
)
from transferkit.training.epoch import (
    EpochSums,
    Guard,
    StepModel,
    out_of_memory_stops,
    train_one_epoch,
)
from transferkit.training.lrfind import RULE as LR_RULE
from transferkit.training.lrfind import lr_find
from transferkit.training.optim import make_optimizer, warmup_cosine
from transferkit.training.precision import runtime_for, serving_check
from transferkit.training.preempt import Preempted, StopSignals
from transferkit.training.regularize import L2SP
from transferkit.training.rundir import (
    _key,
    all_finite,
    default_name,
    keep_top,
    make_run_dir,
    prune_top,
)
from transferkit.training.strategy import (
    apply_phase,
    count_trainable,
    make_plan,
    trainable_groups,
)


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


def _headline(test: dict | None) -> dict | None:
    return None if test is None else {k: test[k] for k in ("accuracy", "macro_f1", "n", "loss")}
