"""The loop's explicit parameters for what comes next: a per-epoch report that may stop the run (a tuner's
pruner) and an extra loss term on batches of its own loader (domain adaptation)."""

import json

import torch
from helpers import assert_same_weights, weights

import transferkit
from transferkit.data.sources import load_data
from transferkit.models.task import ImageTask, Task, TextTask, task_for


def test_on_epoch_sees_each_validated_row_and_may_stop_the_run(shapes_dir, tiny):
    seen = []

    def prune(row: dict) -> bool:
        seen.append(row)
        return row["epoch"] == 2

    run = transferkit.train(data=str(shapes_dir), strategy="finetune", on_epoch=prune, **{**tiny, "epochs": 4})
    assert [r["epoch"] for r in seen] == [1, 2] and all(r["val_accuracy"] is not None for r in seen)
    assert run.metrics["epochs_run"] == 2
    assert [json.loads(r)["epoch"] for r in (run.dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


class HeadPull:
    """A term: pull the model's outputs on batches of its own (random images, in a forward of their own)
    toward zero."""

    def __init__(self, weight: float):
        self.weight, self.calls = weight, 0
        self.generator = torch.Generator().manual_seed(0)

    def start_epoch(self, steps_done):
        pass

    def inputs(self):
        return None  # its batches run in a forward of their own, below

    def __call__(self, model, seen):
        assert len(seen.logits) == seen.size  # no rows were appended to the batch's
        self.calls += 1
        images = torch.rand(4, 3, 32, 32, generator=self.generator)
        return self.weight * model(images.sub(0.5).div(0.5)).float().pow(2).mean()

    def parameters(self):
        return []

    def epoch_metrics(self, model):
        return {"head_pull_calls": self.calls}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_a_term_runs_on_every_micro_batch_and_changes_the_weights(shapes_dir, tiny):
    common = {**tiny, "data": str(shapes_dir), "strategy": "full", "batch_size": 4, "epochs": 1}
    plain = transferkit.train(name="plain", **common)
    none = HeadPull(0.0)
    zero = transferkit.train(name="zero", terms=[none], **common)
    pulled = HeadPull(10.0)
    pull = transferkit.train(name="pull", terms=[pulled], **common)
    assert none.calls == 4  # 16 training images, batches of 4: a term per micro-batch
    assert pulled.calls == 4
    row = json.loads((pull.dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["head_pull_calls"] == 4  # its epoch_metrics joined the epoch's row
    assert torch.load(pull.dir / "last.ckpt", weights_only=False)["terms"] == [{"calls": 4}]
    weights = {
        name: torch.load(run.dir / "last.ckpt", weights_only=True)["model"]["head.1.weight"]
        for name, run in (("plain", plain), ("zero", zero), ("pull", pull))
    }
    assert torch.equal(weights["plain"], weights["zero"])  # a zero term changes nothing
    assert not torch.allclose(weights["plain"], weights["pull"])


class _PixelsInADict:
    """A split's images as ({"pixels": image}, label, index) items."""

    def __init__(self, images):
        self.images, self.samples = images, images.samples

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        image, label, index = self.images[key]
        return {"pixels": image}, label, index


class DictBatches(ImageTask):
    """The image task with batches that are not image tensors: dicts, unpacked by its `move`."""

    name = "dict-images"

    def __init__(self):
        self.moved = 0

    def dataset(self, data, split, transform, config, images=None, min_side=None):
        return _PixelsInADict(super().dataset(data, split, transform, config, images, min_side))

    def move(self, inputs, rt):
        self.moved += 1
        return rt.batch(inputs["pixels"])


def test_a_task_with_its_own_batches_plugs_in_and_trains_what_the_image_task_trains(shapes_dir, tiny):
    common = {**tiny, "data": str(shapes_dir), "strategy": "finetune", "batch_size": 4, "epochs": 2}
    data = load_data(str(shapes_dir))
    assert isinstance(task_for(data), ImageTask) and isinstance(DictBatches(), Task) and isinstance(TextTask(), Task)
    images = transferkit.train(name="images", **common)
    task = DictBatches()
    dicts = transferkit.train(name="dicts", task=task, **common)
    assert task.moved >= 2 * 4 + 2  # training steps, validation and test batches all went through it
    assert_same_weights(weights(images.dir), weights(dicts.dir))
    assert dicts.metrics["test"] == images.metrics["test"]
