"""Domain adaptation: a labelled source, an unlabelled target, and one more named loss in the loop.

`Adaptation` is a term of the objective (`models.objective.Term`): each training micro-batch it brings a
batch of target images that runs in the same forward as the source images (BatchNorm normalises the
mixed batch, and its running statistics stay the mixture that training saw); it gets every row's
pre-logit features (the pooled features, or a `--head bottleneck`'s output: `forward_head(pre_logits=True)`)
and logits, splits them into source and target and returns the method's loss:

- dann (Ganin et al. 2016): a domain discriminator on the features through a gradient reversal layer
  whose coefficient rises as 2 / (1 + exp(-10 p)) - 1 over training progress p in [0, 1].
- cdan (Long et al. 2018): the discriminator sees the features conditioned on the predictions (their
  outer product, the predictions detached), through the same reversal.
- mcc (Jin et al. 2020): minimum class confusion of the target predictions (temperature 2.5,
  entropy-weighted); no discriminator.
- dann-mcc: both terms summed, the discriminator's on the features and MCC's on the target predictions (MCC's
  paper reports it adding to DANN).
- coral (Sun and Saenko 2016): the distance between source and target feature covariances.

The discriminator is a submodule of the objective: it trains with the model (its parameters join the
optimizer at the head's LR; with several processes DDP averages its gradients like the model's) and its
state goes into last.ckpt. The target
loader is sharded over the processes like the source's. `Watch` measures each epoch in eval mode what
needs no target label (mean prediction entropy over every target image, proxy A-distance, a PCA of the
features) and, with `--target-eval`, the target accuracy: those labels reach no loss and no checkpoint
choice. `select_rule` resolves `--select auto`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from transferkit.core.files import write_text
from transferkit.core.registry import ADAPTATIONS
from transferkit.data.check import write_skipped
from transferkit.data.loaders import make_loader
from transferkit.data.target import labelled_set, load_target
from transferkit.evaluation.domain import POINTS, mean_entropy, pca_2d, proxy_a_distance
from transferkit.evaluation.passes import evaluate_loader
from transferkit.models.objective import Seen

DEFAULT = "dann-mcc"
"""What `--adapt auto` runs."""
SELECT = "target-entropy"
"""What `--select auto` uses with a target: the label-free checkpoint rule measured best
(benchmarks/results/adapt.md)."""


class GradientReverse(torch.autograd.Function):
    """Identity forward; the gradient times -coefficient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def reversal_coefficient(progress: float) -> float:
    """DANN's schedule: 0 at the start, towards 1 at the end (progress in [0, 1])."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


def discriminator(features: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, 1),
    )


def class_confusion(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """MCC's loss on a batch of target logits."""
    probs = F.softmax(logits / temperature, dim=1)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(1)
    weight = 1.0 + torch.exp(-entropy)
    weight = (len(probs) * weight / weight.sum()).unsqueeze(1)
    confusion = (probs * weight).t() @ probs
    confusion = confusion / confusion.sum(1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / probs.shape[1]


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CORAL's loss: squared Frobenius distance of the feature covariances, / 4 d^2."""

    def covariance(x):
        x = x - x.mean(0, keepdim=True)
        return x.t() @ x / max(len(x) - 1, 1)

    d = source.shape[1]
    return (covariance(source) - covariance(target)).pow(2).sum() / (4 * d * d)


@dataclass(frozen=True)
class Method:
    """An adaptation method: its loss on the source and target rows (pre-logit features and logits), given
    the `Adaptation` it runs in (for its discriminator), and which discriminator that needs, if any:
    "features" sees the features, "conditioned" their outer product with the predictions."""

    loss: Callable[..., torch.Tensor]
    discriminator: str | None = None


def _dann(adaptation, fs, ls, ft, lt) -> torch.Tensor:
    return adaptation.domain_loss(fs, ft)


def _cdan(adaptation, fs, ls, ft, lt) -> torch.Tensor:
    """The features x the predictions, the predictions a fixed condition (detached)."""
    ps, pt = F.softmax(ls, 1).detach(), F.softmax(lt, 1).detach()
    conditioned_s = torch.bmm(ps.unsqueeze(2), fs.unsqueeze(1)).flatten(1)
    conditioned_t = torch.bmm(pt.unsqueeze(2), ft.unsqueeze(1)).flatten(1)
    return adaptation.domain_loss(conditioned_s, conditioned_t)


def _mcc(adaptation, fs, ls, ft, lt) -> torch.Tensor:
    return class_confusion(lt)


def _dann_mcc(adaptation, fs, ls, ft, lt) -> torch.Tensor:
    return adaptation.domain_loss(fs, ft) + class_confusion(lt)


def _coral(adaptation, fs, ls, ft, lt) -> torch.Tensor:
    return coral(fs, ft)


DANN = Method(_dann, "features")
CDAN = Method(_cdan, "conditioned")
MCC = Method(_mcc)
DANN_MCC = Method(_dann_mcc, "features")
CORAL = Method(_coral)
NONE = None
"""Source only: no term, no target batches (measured exactly as the adapted runs are)."""


class Adaptation(nn.Module):
    """One method's term of the objective (`models.objective.Term`) on the run's target batches (see the
    module docstring). Its discriminator is a submodule: it trains with the model and DDP averages it."""

    def __init__(
        self,
        method: str,
        features: int,
        num_classes: int,
        target_loader,
        move,
        weight: float,
        total_steps: int,
        watch: Watch | None = None,
    ):
        super().__init__()
        self.method, self.loader, self.move, self.weight, self.watch = method, target_loader, move, weight, watch
        self.total_steps, self.step = max(total_steps, 1), 0
        self.rule = ADAPTATIONS.load(method)  # a Method; None for source only
        kind = self.rule.discriminator if self.rule is not None else None
        width = features * num_classes if kind == "conditioned" else features
        self.discriminator = discriminator(width) if kind is not None else None
        self.sums = _zero_sums()
        self.start_epoch(0)

    def start_epoch(self, steps_done: int) -> None:
        """Target batches as an epoch from its start draws them, past the micro-batches of `steps_done` steps:
        each epoch cycles the target loader from its first order again."""
        self._batches = None if self.rule is None else self._cycle(steps_done)

    def _cycle(self, steps_done: int):
        sampler = self.loader.batch_sampler
        cycle, skip = divmod(steps_done, len(sampler.step_sizes()))
        while True:
            sampler.set_epoch(cycle, skip_steps=skip)
            for images, _, _ in self.loader:  # the target's placeholder labels are never read
                yield images
            cycle, skip = cycle + 1, 0

    def inputs(self) -> torch.Tensor | None:
        """The next target micro-batch on the device (none for source only)."""
        return None if self._batches is None else self.move(next(self._batches))

    def forward(self, model: nn.Module, seen: Seen) -> torch.Tensor:
        if self.rule is None:  # source only
            return torch.zeros((), device=seen.logits.device)
        n, features, logits = seen.size, seen.features.float(), seen.logits.float()
        loss = self.rule.loss(self, features[:n], logits[:n], features[n:], logits[n:])
        self.step += 1
        self.sums["loss"] += float(loss.detach())
        self.sums["terms"] += 1
        return self.weight * loss

    def domain_loss(self, fs, ft) -> torch.Tensor:
        """The discriminator's loss on source and target rows, through the gradient reversal."""
        features = GradientReverse.apply(torch.cat([fs, ft]), reversal_coefficient(self.step / self.total_steps))
        domain = self.discriminator(features).squeeze(1)
        truth = torch.cat([torch.ones(len(fs)), torch.zeros(len(ft))]).to(domain.device)
        self.sums["domain_hits"] += int(((domain > 0).float() == truth).sum())
        self.sums["domain_seen"] += len(truth)
        return F.binary_cross_entropy_with_logits(domain, truth)

    def epoch_metrics(self, model: nn.Module) -> dict:
        """The epoch's mean adaptation loss and discriminator accuracy over its training steps (the sums
        start again), and the watch's measures of `model` (eval mode)."""
        s = self.sums
        domain_accuracy = s["domain_hits"] / s["domain_seen"] if s["domain_seen"] else None
        out = {"adapt_loss": s["loss"] / max(s["terms"], 1), "domain_accuracy": domain_accuracy}
        self.sums = _zero_sums()
        if self.watch is not None:
            out.update(self.watch.look(model, "after"))
        return out

    def get_extra_state(self) -> dict:
        """The step (the reversal's schedule) in the state_dict, beside the discriminator's weights."""
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = state["step"]


def saved_terms(state: dict, terms: list) -> list[dict]:
    """The terms' states from a last.ckpt written before objectives: adaptation's was its "extra" entry
    (the step and the discriminator's weights); L2-SP kept none."""
    extra = state.get("extra")
    if extra is None:
        return []
    weights = {f"discriminator.{key}": value for key, value in (extra.get("discriminator") or {}).items()}
    adapted = {**weights, "_extra_state": {"step": extra["step"]}}
    return [adapted if isinstance(term, Adaptation) else {} for term in terms]


class _PreLogits(nn.Module):
    """A classifier's logits, with each batch's pre-logit features kept aside (what `Watch` measures)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.kept = model, []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_head(self.model.backbone(inputs), pre_logits=True)
        self.kept.append(features.float().cpu())
        return self.model.head[-1](features)


class Watch:
    """What adaptation measures each epoch with the model in eval mode, none of it reaching a loss: the
    mean prediction entropy over every target image (a label-free checkpoint score, `--select
    target-entropy`), the proxy A-distance between source validation and target features, and with
    `--target-eval` the target accuracy (its labels are only counted). `look(model, "before" | "after")`
    also writes a 2-D PCA of those features to `points` (adapt-features.json) for the report."""

    PLOTTED = 600
    """Target images kept in the PCA plot."""

    def __init__(self, target, source, labelled, rt, d, move, points: Path | None):
        self.target, self.source, self.labelled = target, source, labelled
        self.rt, self.d, self.move, self.points = rt, d, move, points
        self.loss = nn.CrossEntropyLoss()

    def saw(self, when: str) -> bool:
        return self.points is not None and self.points.is_file() and when in json.loads(self.points.read_text())

    def _features(self, model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
        """(logits of the whole split, gathered; this rank's features) of `loader` in eval mode."""
        probe = _PreLogits(model)
        logits = evaluate_loader(probe, loader, self.loss, self.rt, d=self.d, move=self.move)["logits"]
        return logits, torch.cat(probe.kept).numpy() if probe.kept else np.zeros((0, 0), np.float32)

    def look(self, model: nn.Module, when: str) -> dict:
        was_training = model.training
        logits, target = self._features(model, self.target)
        source = self._features(model, self.source)[1] if self.source is not None else None
        out = {
            "target_entropy": mean_entropy(logits),
            "proxy_a_distance": proxy_a_distance(source, target) if source is not None else None,
        }
        if self.labelled is not None:
            out["target_accuracy"] = evaluate_loader(
                model, self.labelled, self.loss, self.rt, d=self.d, move=self.move
            )["accuracy"]
        if self.points is not None and source is not None:
            s2, t2 = pca_2d(source, target[: self.PLOTTED])
            saved = json.loads(self.points.read_text()) if self.points.is_file() else {}
            saved[when] = {"source": s2.round(4).tolist(), "target": t2.round(4).tolist(), **out}
            write_text(self.points, json.dumps(saved))
        model.train(was_training)
        return out


def _zero_sums() -> dict:
    return {"loss": 0.0, "domain_hits": 0, "domain_seen": 0, "terms": 0}


def select_rule(config) -> str:
    """The run's checkpoint rule, `--select` with auto resolved: val without a target, SELECT with one."""
    if config.select != "auto":
        return config.select
    return SELECT if config.target is not None else "val"


def adaptation_for(r) -> Adaptation | None:
    """The run's adaptation, from its config (`--target`), for recipe `r` (data, model, loaders built), or
    None without a target."""
    c = r.config
    if c.target is None:
        return None
    method = DEFAULT if c.adapt == "auto" else c.adapt
    target = load_target(c.target, r.data, say=r.report.info)
    if target.skipped and r.d.main:
        write_skipped(r.run_dir / "target-skipped.txt", target.skipped)
    on_device, task = r.rt.normalizes_on_device, r.task
    loader = make_loader(
        target,
        "train",
        task.transform(r.prep, c, True, on_device, False),
        c,
        shuffle=True,
        min_side=r.prep.resize,
        d=r.d,
        reader=task.dataset,
    )
    eval_transform = task.transform(r.prep, c, False, on_device, False)
    labelled = labelled_set(c.target_eval, r.data.classes) if c.target_eval is not None else None
    scan = [
        make_loader(data, split, eval_transform, c, min_side=r.prep.resize, d=r.d, reader=task.dataset)
        if data is not None
        else None
        for data, split in ((target, "train"), (labelled, "test"))
    ]
    source = r.loaders["val"] if r.data.splits["val"] else None
    watch = Watch(scan[0], source, scan[1], r.rt, r.d, r.move, r.run_dir / POINTS if r.d.main else None)
    if not watch.saw("before"):  # a resumed run keeps its first look
        watch.look(r.model, "before")
    r.report.info(
        f"[transferkit] adapting to {c.target} ({len(target.splits['train'])} unlabelled images"
        + (f", {len(target.skipped)} skipped" if target.skipped else "")
        + f") with {method}"
        + (f" (weight {c.adapt_weight:g})" if method != "none" else " (none: source only)")
        + (
            f"; measuring on {c.target_eval} ({len(labelled.splits['test'])} labelled images, never trained on)"
            if labelled
            else ""
        )
    )
    total = sum(phase.epochs for phase in r.plan) * len(r.loaders["train"])
    features = r.model.head[-1].in_features  # what the discriminator sees: the head's pre-logit features
    adaptation = Adaptation(method, features, len(r.data.classes), loader, r.move, c.adapt_weight, total, watch)
    return adaptation.to(r.device)
