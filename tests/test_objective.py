"""The objective seam (issue 36): the epoch loop trains whatever `objective(inputs, targets)` computes —
here a toy in a detector's shape (targets a list of dicts, the model's loss a dict, no logits) — and
classification's objective computes what the loop used to: cross-entropy, hits, terms on explicit
features."""

import inspect
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from transferkit.core.config import TrainConfig
from transferkit.core.distributed import Dist
from transferkit.core.progress import Reporter
from transferkit.data.sampling import EpochSampler, StepBatches
from transferkit.models.classifier import Classifier, make_head
from transferkit.models.objective import Classification, Seen, StepOutput
from transferkit.models.runtime import Runtime
from transferkit.training.epoch import EpochContext, EpochSums, Guard, Update, train_one_epoch


class _Boxes(torch.utils.data.Dataset):
    """Points in the unit square with one box each, centred on the point: (point, {"boxes", "labels"}, index)."""

    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(0)
        self.points = torch.rand(n, 2, generator=generator)
        self.samples = [(f"point{i}", 0) for i in range(n)]  # what the NaN guard names

    def __len__(self):
        return len(self.points)

    def __getitem__(self, key):
        index, _seed = key
        x, y = self.points[index].tolist()
        boxes = torch.tensor([[x - 0.1, y - 0.1, x + 0.1, y + 0.1]])
        return self.points[index], {"boxes": boxes, "labels": torch.tensor([1])}, index

    @staticmethod
    def collate(items):
        inputs, targets, indices = zip(*items)
        return torch.stack(inputs), list(targets), torch.tensor(indices)


class _BoxRegression(nn.Module):
    """A detector-shaped objective: the model returns a loss dict; the step's loss is its sum."""

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(2, 4)

    def losses(self, inputs, targets) -> dict:
        boxes = torch.cat([t["boxes"] for t in targets])
        predicted = self.model(inputs)
        return {
            "loss_box": F.smooth_l1_loss(predicted, boxes),
            "loss_size": (predicted[:, 2:] - predicted[:, :2]).var(),
        }

    def forward(self, inputs, targets) -> StepOutput:
        losses = self.losses(inputs, targets)
        counts = {name: value.detach() * len(inputs) for name, value in losses.items()}
        return StepOutput(sum(losses.values()), len(inputs), counts)


def _loader(n: int, batch: int) -> torch.utils.data.DataLoader:
    dataset = _Boxes(n)
    sampler = StepBatches(EpochSampler(n, seed=0), batch)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_Boxes.collate)


def test_the_epoch_loop_takes_few_parameters_and_names_no_classification():
    source = inspect.getsource(train_one_epoch)
    assert len(inspect.signature(train_one_epoch).parameters) <= 6
    for word in ("logits", "labels", "argmax", "cross_entropy", "correct", "accuracy", "mixer", "extra"):
        assert word not in source, word


def test_a_loss_dict_objective_trains_through_the_unchanged_loop(tmp_path):
    torch.manual_seed(0)
    objective, loader = _BoxRegression(), _loader(64, 16)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = TrainConfig(data="none", runs_dir=str(tmp_path))
    steps = []
    context = EpochContext(
        Runtime(torch.device("cpu")),
        Dist(),
        Guard(config, None, 0, 0),
        Reporter(quiet=True),
        lambda sums, step_loss: steps.append(step_loss),
    )
    inputs, targets, _ = next(iter(_loader(64, 64)))
    with torch.no_grad():
        before = sum(objective.losses(inputs, targets).values()).item()
    epochs = []
    for epoch in range(20):
        loader.batch_sampler.set_epoch(epoch)
        epochs.append(train_one_epoch(objective, loader, Update(optimizer, scheduler), EpochSums(), context))
    with torch.no_grad():
        after = sum(objective.losses(inputs, targets).values()).item()
    assert len(steps) == 20 * 4  # 64 points in steps of 16
    assert epochs[0].seen == 64
    assert epochs[0].step == 4
    assert set(epochs[0].means()) == {"loss_box", "loss_size"}  # the objective's counts, as means per sample
    assert epochs[0].means()["loss_box"] + epochs[0].means()["loss_size"] == pytest.approx(
        epochs[0].loss_sum / 64, rel=1e-5
    )
    assert after < before / 4  # it learned to put the boxes on the points
    assert math.isfinite(after)


def _classifier(classes: int = 3) -> Classifier:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    return Classifier(backbone, make_head(8, classes, "bottleneck", 6, 0.0))


class _Rows:
    """A term that brings rows of its own and records what it saw."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.seen = rows, None

    def inputs(self):
        return self.rows

    def __call__(self, model, seen: Seen):
        self.seen = seen
        return seen.logits[seen.size :].pow(2).mean()


def test_classification_objective_is_cross_entropy_hits_and_its_terms_on_explicit_features():
    torch.manual_seed(0)
    model = _classifier().eval()  # BatchNorm on running statistics: rows do not affect each other
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    inputs, labels, extra = torch.randn(5, 12), torch.tensor([0, 1, 2, 0, 1]), torch.randn(3, 12)
    plain = Classification(model, criterion)(inputs, labels)
    logits = model(inputs)
    assert plain.size == 5
    assert torch.allclose(plain.loss, criterion(logits, labels))
    assert plain.counts["accuracy"].item() == (logits.argmax(1) == labels).sum().item()

    term = _Rows(extra)
    out = Classification(model, criterion, terms=(term,))(inputs, labels)
    assert term.seen.size == 5
    assert term.seen.features.shape == (8, 6)  # the bottleneck's output: the last linear layer's input
    assert torch.allclose(term.seen.logits, model(torch.cat([inputs, extra])), atol=1e-6)
    assert torch.allclose(model.head[-1](term.seen.features), term.seen.logits)
    assert torch.allclose(out.loss, plain.loss + model(extra).pow(2).mean(), atol=1e-6)


def test_a_frozen_backbone_gets_no_gradient_and_cached_features_skip_it():
    model = _classifier()
    objective = Classification(model, nn.CrossEntropyLoss())
    inputs, labels = torch.randn(4, 12), torch.tensor([0, 1, 2, 0])
    objective.encode = "frozen"
    objective(inputs, labels).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    objective.encode = "features"
    features = model.backbone(inputs).detach()
    assert torch.allclose(objective(features, labels).loss, objective.criterion(model.head(features), labels))
