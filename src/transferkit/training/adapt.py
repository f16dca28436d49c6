"""Domain adaptation: a labelled source, an unlabelled target, and one more named loss in the loop.

`Adaptation` is an `epoch.ExtraLoss`: each training micro-batch, `join` appends a batch of target images
to the source images, so one forward runs both (BatchNorm normalises the mixed batch, and its running
statistics stay the mixture that training saw); a hook on `model.head` keeps the head's input, the
pooled features; `term` splits features and logits into source and target and returns the method's loss:

- dann (Ganin et al. 2016): a domain discriminator on the features through a gradient reversal layer
  whose coefficient rises as 2 / (1 + exp(-10 p)) - 1 over training progress p in [0, 1].
- cdan (Long et al. 2018): the discriminator sees the features conditioned on the predictions (their
  outer product, the predictions detached), through the same reversal.
- mcc (Jin et al. 2020): minimum class confusion of the target predictions (temperature 2.5,
  entropy-weighted); no discriminator.
- coral (Sun and Saenko 2016): the distance between source and target feature covariances.

The discriminator trains with the model (its parameters join the optimizer at the head's LR) and its
state goes into last.ckpt. `epoch_metrics` adds to each epoch's row the adaptation loss, the
discriminator's domain accuracy, the target's mean prediction entropy, and, with `--target-eval`, the
target accuracy (measured only: those labels reach no loss and no checkpoint choice).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from transferkit.core.errors import UserError
from transferkit.data.check import write_skipped
from transferkit.data.loaders import make_loader
from transferkit.data.target import labelled_set, load_target
from transferkit.evaluation.passes import evaluate_loader

DEFAULT = "dann"
"""What `--adapt auto` runs."""


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
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, 1))


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


class Adaptation:
    """One method's adaptation loss on the run's target batches (see the module docstring)."""

    def __init__(self, method: str, model: nn.Module, target_loader, move, weight: float, total_steps: int,
                 num_classes: int, feature_dim: int, device: torch.device, measure=None):
        self.method, self.loader, self.move, self.weight = method, target_loader, move, weight
        self.measure = measure  # model -> target accuracy on --target-eval, or None
        self.total_steps, self.step = max(total_steps, 1), 0
        inputs = feature_dim * num_classes if method == "cdan" else feature_dim
        self.discriminator = discriminator(inputs).to(device) if method in ("dann", "cdan") else None
        self.last = None  # the head's input (pooled features) and output in the latest training forward
        model.head.register_forward_hook(self._keep)
        self.sums = _zero_sums()

    def _keep(self, module, args, out) -> None:
        if module.training:
            self.last = (args[0], out)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    def batches(self):
        cycle = 0
        while True:
            if self.method == "none":  # source only: no target batch is needed
                yield None
                continue
            self.loader.batch_sampler.set_epoch(cycle)
            for images, _, _ in self.loader:  # the target's placeholder labels are never read
                yield images
            cycle += 1

    def join(self, inputs: torch.Tensor, batch) -> torch.Tensor:
        return inputs if batch is None else torch.cat([inputs, self.move(batch)])

    def term(self, model: nn.Module, batch, rt, outputs: torch.Tensor) -> torch.Tensor:
        seen, self.last = self.last, None
        if batch is None or seen is None:  # source only, or no training forward to adapt
            return torch.zeros((), device=rt.device)
        features, logits = seen
        n = len(features) - len(outputs)  # the source rows come first, the joined target rows after
        loss = self._loss(features[:n].float(), logits[:n].float(), features[n:].float(), outputs.float())
        self.step += 1
        self.sums["loss"] += float(loss.detach())
        self.sums["terms"] += 1
        probs = F.softmax(outputs.detach().float(), 1)
        self.sums["entropy"] += float(-(probs * torch.log(probs + 1e-12)).sum(1).mean())
        return self.weight * loss

    def _loss(self, fs, ls, ft, lt) -> torch.Tensor:
        if self.method == "mcc":
            return class_confusion(lt)
        if self.method == "coral":
            return coral(fs, ft)
        if self.method == "cdan":  # features x predictions, the predictions a fixed condition
            ps, pt = F.softmax(ls, 1).detach(), F.softmax(lt, 1).detach()
            fs, ft = torch.bmm(ps.unsqueeze(2), fs.unsqueeze(1)).flatten(1), \
                torch.bmm(pt.unsqueeze(2), ft.unsqueeze(1)).flatten(1)
        features = GradientReverse.apply(torch.cat([fs, ft]), reversal_coefficient(self.step / self.total_steps))
        domain = self.discriminator(features).squeeze(1)
        truth = torch.cat([torch.ones(len(fs)), torch.zeros(len(ft))]).to(domain.device)
        self.sums["domain_hits"] += int(((domain > 0).float() == truth).sum())
        self.sums["domain_seen"] += len(truth)
        return F.binary_cross_entropy_with_logits(domain, truth)

    def epoch_metrics(self, model: nn.Module) -> dict:
        """The epoch's adaptation loss, discriminator accuracy and mean target prediction entropy (over its
        training steps; the sums start again), and with `--target-eval` the target accuracy of `model`
        (measured only)."""
        s = self.sums
        out = {"adapt_loss": s["loss"] / max(s["terms"], 1),
               "domain_accuracy": s["domain_hits"] / s["domain_seen"] if s["domain_seen"] else None,
               "target_entropy": s["entropy"] / s["terms"] if s["terms"] else None}
        self.sums = _zero_sums()
        if self.measure is not None:
            out["target_accuracy"] = self.measure(model)
        return out

    def state_dict(self) -> dict:
        return {"step": self.step,
                "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])


def _zero_sums() -> dict:
    return {"loss": 0.0, "domain_hits": 0, "domain_seen": 0, "terms": 0, "entropy": 0.0}


def adaptation_for(r) -> Adaptation | None:
    """The run's adaptation, from its config (`--target`), for recipe `r` (data, model, loaders built), or
    None without a target."""
    c = r.config
    if c.target is None:
        return None
    if c.compile:
        raise UserError("--target does not combine with --compile yet (the adaptation reads the head's input "
                        "through a hook): drop --compile.")
    method = DEFAULT if c.adapt == "auto" else c.adapt
    target = load_target(c.target, r.data, say=r.report.info)
    if target.skipped and r.d.main:
        write_skipped(r.run_dir / "target-skipped.txt", target.skipped)
    on_device, task = r.rt.normalizes_on_device, r.task
    loader = make_loader(target, "train", task.transform(r.prep, c, True, on_device, False), c, shuffle=True,
                         min_side=r.prep.resize, d=r.d, reader=task.dataset)
    measure = None
    if c.target_eval is not None:
        labelled = labelled_set(c.target_eval, r.data.classes)
        scored = make_loader(labelled, "test", task.transform(r.prep, c, False, on_device, False), c,
                             min_side=r.prep.resize, d=r.d, reader=task.dataset)
        loss = nn.CrossEntropyLoss()

        def measure(model):
            return evaluate_loader(model, scored, loss, r.rt, d=r.d, move=r.move)["accuracy"]

    r.report.info(f"[transferkit] adapting to {c.target} ({len(target.splits['train'])} unlabelled images"
                  + (f", {len(target.skipped)} skipped" if target.skipped else "") + f") with {method}"
                  + (f" (weight {c.adapt_weight:g})" if method != "none" else " (none: source only)")
                  + (f"; measuring on {c.target_eval} ({len(labelled.splits['test'])} labelled images, never trained "
                     "on)" if measure else ""))
    total = sum(phase.epochs for phase in r.plan) * len(r.loaders["train"])
    return Adaptation(method, r.model, loader, r.move, c.adapt_weight, total, len(r.data.classes),
                      r.record["features"], r.device, measure)
