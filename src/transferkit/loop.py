"""The training loop: setup -> phases of epochs (train, validate, keep the best) -> test -> save.

No callbacks and no trainer class: the loop below is the whole story. The run directory
holds config.yaml, split.json, classes.json, metrics.jsonl (one row per epoch),
metrics.json (final), last.ckpt (state to continue from) and best/ (the bundle).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit import __version__
from transferkit.bundle import load_bundle, save_bundle
from transferkit.config import TrainConfig
from transferkit.data import Data, ImageDataset, load_data
from transferkit.errors import UserError
from transferkit.metrics import classification_metrics
from transferkit.model import build_classifier, layer_groups
from transferkit.lrfind import RULE as LR_RULE
from transferkit.lrfind import lr_find
from transferkit.optim import make_optimizer, warmup_cosine
from transferkit.progress import Reporter
from transferkit.regularize import L2SP
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
    `resume="runs/NAME"` continues that run from its last.ckpt with its own config, split and plan.
    """
    state = None
    if resume is not None:
        config, state = _resume_state(Path(resume), overrides)
    else:
        config = config.replace(**overrides) if config is not None else TrainConfig.from_dict(overrides)
    started = time.perf_counter()
    report = report or Reporter(config.quiet)

    # --- setup: data, model, plan, run directory -------------------------------------------
    seed_everything(config.seed)
    device = pick_device(config.device)
    if state is not None:  # the run's own split, exactly (few-shot selection included)
        data = load_data(config.data, split_file=str(Path(resume) / "split.json"))
    else:
        data = load_data(config.data, seed=config.seed, val_fraction=config.val_fraction,
                         test_fraction=config.test_fraction, shots=config.shots, split_file=config.split_file)
    model, record, prep = build_classifier(
        config.model, "none" if config.strategy == "scratch" else config.weights, len(data.classes),
        in_chans=config.in_chans, img_size=config.img_size or data.default_img_size,
        head=config.head, head_hidden=config.head_hidden, head_dropout=config.head_dropout,
        drop_path=config.drop_path)
    model.to(device)
    workers = config.workers if config.workers is not None else default_workers(data)
    groups = layer_groups(model.backbone)
    if state is not None:
        run_dir = Path(resume)
        plan = [Phase.from_dict(p) for p in state["plan"]]
    else:
        run_dir = make_run_dir(Path(config.runs_dir), config.name or default_name(config),
                               auto=config.name is None, overwrite=config.overwrite)
        config = config.replace(img_size=prep.img_size, workers=workers, name=run_dir.name)
        plan = make_plan(config, len(groups))
        config.save(run_dir / "config.yaml")
        data.save_split(run_dir / "split.json")
        (run_dir / "classes.json").write_text(json.dumps(data.classes))
        (run_dir / "plan.json").write_text(json.dumps([p.to_dict() for p in plan], indent=1))
    report.info(
        f"[transferkit] {run_dir}: {config.model} ({record['weights']}), {config.strategy}, "
        f"{len(data.classes)} classes, train/val/test = "
        f"{'/'.join(str(len(data.splits[s])) for s in ('train', 'val', 'test'))} ({data.how}), "
        f"{prep.img_size}px, {len(groups)} layer groups, device {device}")

    counts = data.counts("train")
    if max(counts.values()) >= 10 * min(counts.values()) and config.class_weights == "none" \
            and config.sampler == "shuffle":
        report.info(f"[transferkit] warning: classes are imbalanced (largest {max(counts.values())}, smallest "
                    f"{min(counts.values())} training images); consider --class-weights auto or --sampler balanced")
    loaders = {
        "train": make_loader(data, "train", train_transform(prep, config.augment), config, shuffle=True),
        "val": make_loader(data, "val", eval_transform(prep), config),
        "test": make_loader(data, "test", eval_transform(prep), config),
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
    if config.lr == "auto" and state is None:
        probe = make_plan(config.replace(lr=1e-3, lr_min=None), len(groups))[0]
        found = lr_find(model, groups, probe, loaders["train"], hard_loss, config.replace(lr=1e-3), device)
        found.plot(run_dir / "lr_find.png")
        config = config.replace(lr=found.suggestion)
        plan = make_plan(config, len(groups))
        config.save(run_dir / "config.yaml")
        (run_dir / "plan.json").write_text(json.dumps([p.to_dict() for p in plan], indent=1))
        report.info(f"[transferkit] lr auto: {found.suggestion:.2e} ({LR_RULE}; {len(found.lrs)} steps, "
                    f"plot {run_dir / 'lr_find.png'})")
    eval_loss = nn.CrossEntropyLoss()  # val/test loss without smoothing, comparable across configs
    meta = {"transferkit_version": __version__, "architecture": record, "classes": data.classes,
            "preprocessing": prep.to_dict(), "strategy": {"name": config.strategy, "plan": [p.to_dict() for p in plan]},
            "data": {"spec": config.data, "how": data.how}}

    # --- epochs ----------------------------------------------------------------------------
    best = {"epoch": None, "val_accuracy": -1.0, "val_loss": math.inf}
    epoch, since_best, stop = 0, 0, False
    if state is None:
        (run_dir / "metrics.jsonl").write_text("")
    else:  # rows written after the checkpoint belong to the lost part of the run
        model.load_state_dict(state["model"])  # after L2SP took its pretrained reference
        epoch, best, since_best = state["epoch"], state["best"], state["since_best"]
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows[:epoch]))
        set_rng_state(state["rng"], loaders["train"].generator)
        report.info(f"[transferkit] resuming {run_dir} after epoch {epoch}")
    total_epochs = sum(p.epochs for p in plan)
    report.start(total_epochs)
    try:
        for phase_index, phase in enumerate(plan):
            before = sum(p.epochs for p in plan[:phase_index])  # epochs of the earlier phases
            if epoch >= before + phase.epochs:
                continue  # finished before the checkpoint
            apply_phase(model, groups, phase)
            optimizer = make_optimizer(model, groups, phase, config)
            # each phase warms up (at most half its length) and decays on its own
            warmup = round(min(config.warmup_epochs, phase.epochs / 2) * len(loaders["train"]))
            scheduler = warmup_cosine(optimizer, warmup, phase.epochs * len(loaders["train"]))
            if epoch > before:  # resuming inside this phase: its optimizer and schedule continue
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            report.info(f"[transferkit] phase '{phase.name}': groups {phase.groups or 'none'} of "
                        f"{len(groups)} train, BN {phase.bn}, {count_trainable(model):,} trainable parameters")
            for _ in range(epoch - before, phase.epochs):
                epoch += 1
                tick = time.perf_counter()
                train_loss, train_acc, seen = train_one_epoch(
                    model, loaders["train"], optimizer, scheduler, loss_fn, phase, device, report,
                    f"epoch {epoch}/{total_epochs}", mixer, l2sp)
                seconds = time.perf_counter() - tick
                val = evaluate_loader(model, loaders["val"], eval_loss, device) if len(data.splits["val"]) else None
                row = {"epoch": epoch, "phase": phase.name, "groups": trainable_groups(model, groups),
                       "train_loss": train_loss, "train_accuracy": train_acc,
                       "val_loss": val["loss"] if val else None, "val_accuracy": val["accuracy"] if val else None,
                       "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen / seconds, "epoch_s": seconds}
                with (run_dir / "metrics.jsonl").open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                # best by val accuracy, ties broken by lower val loss; without a val split, the latest
                improved = val is None or (val["accuracy"], -val["loss"]) > (best["val_accuracy"],
                                                                              -best["val_loss"])
                if improved:
                    best = {"epoch": epoch, "val_accuracy": val["accuracy"] if val else None,
                            "val_loss": val["loss"] if val else None}
                    save_bundle(run_dir / "best", model, {**meta, "metrics": {"best": best}})
                    since_best = 0
                else:
                    since_best += 1
                save_checkpoint(run_dir / "last.ckpt", model, optimizer, scheduler, config, plan, phase_index,
                                epoch, best, since_best, loaders["train"].generator)
                report.end_epoch(
                    f"epoch {epoch:>3} {phase.name}: train loss {train_loss:.4f} acc {train_acc:.3f}"
                    + (f" | val loss {val['loss']:.4f} acc {val['accuracy']:.3f}" if val else " | no val split")
                    + f" | {seen / seconds:.1f} img/s{' *' if improved else ''}")
                if config.patience and since_best >= config.patience:
                    report.info(f"[transferkit] early stop: no better val score for {config.patience} epochs")
                    stop = True
                    break
            if stop:
                break
    finally:
        report.close()

    # --- test the best checkpoint, exactly as shipped ---------------------------------------
    shipped, _ = load_bundle(run_dir / "best")
    shipped.to(device)
    test = None
    if len(data.splits["test"]):
        test = evaluate_loader(shipped, loaders["test"], eval_loss, device, data.classes)
    metrics = {"test": test, "best": best, "epochs_run": epoch, "trainable_params": count_trainable(model),
               "wall_time_s": time.perf_counter() - started}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_bundle(run_dir / "best", shipped, {**meta, "metrics": {"best": best, "test": _headline(test)}})
    report.info(f"[transferkit] best epoch {best['epoch']}; test "
                + (f"accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} on {test['n']} images; "
                   "recall " + ", ".join(f"{c} {m['recall']:.2f}" for c, m in list(test["per_class"].items())[:20])
                   if test else "skipped (no test split)") + f"; saved {run_dir / 'best'}")
    return Run(dir=run_dir, config=config, metrics=metrics)


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, phase: Phase, device, report: Reporter,
                    description: str, mixer=None, l2sp: L2SP | None = None) -> tuple[float, float, int]:
    """One pass over the training data; returns (mean loss, accuracy on the unmixed labels, images seen)."""
    set_train_mode(model, phase)
    backbone_frozen = not phase.groups
    total_loss, correct, seen = 0.0, 0, 0
    tick = time.perf_counter()
    report.start_epoch(description, len(loader))
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        targets = labels
        if mixer is not None and len(labels) % 2 == 0:  # timm's Mixup pairs images: needs an even batch
            images, targets = mixer(images, labels)
        elif mixer is not None:
            targets = torch.nn.functional.one_hot(labels, mixer.num_classes).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if backbone_frozen:  # nothing below the head trains: skip building the backward graph
                with torch.no_grad():
                    features = model.backbone(images)
                logits = model.head(features)
            else:
                logits = model(images)
            loss = loss_fn(logits.float(), targets)
            if l2sp is not None:
                loss = loss + l2sp.penalty(model.backbone)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        report.batch(total_loss / seen, correct / seen, seen / (time.perf_counter() - tick))
    return total_loss / max(seen, 1), correct / max(seen, 1), seen


@torch.inference_mode()
def evaluate_loader(model, loader, loss_fn, device, classes: list[str] | None = None) -> dict:
    """Loss and accuracy on a loader; with `classes`, the full metrics (F1, per class, confusion)."""
    model.eval()
    losses, preds, targets = [], [], []
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images).float()
        losses.append(loss_fn(logits, labels).item() * len(labels))
        preds.append(logits.argmax(1).cpu())
        targets.append(labels.cpu())
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    out = {"loss": sum(losses) / len(y_true), "accuracy": float((y_pred == y_true).mean())}
    if classes is not None:
        out.update(classification_metrics(y_true, y_pred, classes))
    return out


def make_loader(data: Data, split: str, transform, config: TrainConfig, shuffle: bool = False):
    dataset = ImageDataset(data, split, transform, config.in_chans)
    generator = torch.Generator().manual_seed(config.seed)
    # a last training batch of one image makes BatchNorm statistics meaningless: drop it
    drop_last = shuffle and len(dataset) > config.batch_size and len(dataset) % config.batch_size == 1
    sampler = None
    if shuffle and config.sampler == "balanced":
        counts = data.counts(split)
        weights = [1.0 / counts[label] for _, label in dataset.samples]
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(weights), replacement=True,
                                                         generator=generator)
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=config.workers,
        generator=generator, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
        persistent_workers=config.workers > 0, worker_init_fn=_seed_worker)


def _soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


def save_checkpoint(path: Path, model, optimizer, scheduler, config: TrainConfig, plan, phase_index: int,
                    epoch: int, best: dict, since_best: int, generator: torch.Generator) -> None:
    """Write the state to continue from atomically (temp file + rename): tensors and plain values only,
    so it loads with `torch.load(weights_only=True)`."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "config": config.to_dict(), "plan": [p.to_dict() for p in plan], "phase": phase_index, "epoch": epoch,
             "best": best, "since_best": since_best, "rng": get_rng_state(generator)}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def get_rng_state(generator: torch.Generator) -> dict:
    """Every random stream the loop draws from (numpy's as a tensor: weights_only loads no arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss],
            "torch": torch.get_rng_state(), "loader": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict, generator: torch.Generator) -> None:
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["loader"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _resume_state(run_dir: Path, overrides: dict) -> tuple[TrainConfig, dict]:
    """The saved config and last.ckpt of a run; only display settings may change on resume."""
    ckpt = run_dir / "last.ckpt"
    if not ckpt.is_file() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"Cannot resume '{run_dir}': it needs config.yaml and last.ckpt from an earlier "
                        "`transferkit train`.")
    changed = sorted(set(overrides) - {"quiet", "device", "workers"})
    if changed:
        raise UserError(f"Resuming keeps the run's own config; cannot change {', '.join(changed)}. Start a new "
                        "run (--config RUN/config.yaml) to train with other settings.")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files raise several types
        raise UserError(f"Cannot read checkpoint '{ckpt}': {str(err).splitlines()[0]}") from None
    return TrainConfig.load(run_dir / "config.yaml").replace(**overrides), state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but PyTorch sees no CUDA GPU. Use --device cpu or auto.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_workers(data: Data) -> int:
    """In-memory data decodes nothing: 0 workers. Files: half the cores, so torch keeps the rest."""
    if data.arrays is not None:
        return 0
    return min(8, (os.cpu_count() or 2) // 2)


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
