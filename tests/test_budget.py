"""What a run will need, told before it trains: disk for what it writes, memory for a CPU training step."""

import json

import torch
from torch import nn

import transferkit
from transferkit.training import budget


def test_layer_outputs_count_every_layer_at_batch_1_and_change_nothing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert budget.layer_outputs(model, torch.ones(1, 3, 16, 16)) == 4 * (8 * 16 * 16 * 4)  # 4 layers' outputs
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched


def test_a_step_too_large_for_the_memory_is_named_before_training(shapes_dir, tiny, monkeypatch, capsys):
    monkeypatch.setattr(budget, "available_memory", lambda: 2**20)
    run = transferkit.train(data=str(shapes_dir), strategy="finetune", name="big", **tiny)
    said = capsys.readouterr().err
    assert "warning: a training step at micro-batch 8 needs about" in said, said
    assert "and 1.0 MB (1,048,576 bytes) of memory are available" in said
    assert "--accumulate 2" in said
    estimates = json.loads((run.dir / "runtime.json").read_text())["estimates"]
    step = estimates["step_memory"]
    assert step["activations"] > 0
    assert step["weights"] > 4 * 3_000_000  # lite0: 3.4 M parameters
    assert estimates["memory_available"] == 2**20
    assert estimates["disk"]["run"]["best/ x2 while replaced"] >= 2 * step["weights"]


def test_disk_needs_grow_with_what_the_run_keeps():
    from transferkit.core.config import TrainConfig
    from transferkit.data.sources import Data
    from transferkit.training.strategy import make_plan

    model = nn.Sequential()
    model.add_module("backbone", nn.Linear(10, 10))
    model.add_module("head", nn.Linear(10, 2))
    data = Data(
        spec="x",
        splits={"train": [("a", "c")] * 10, "val": [("a", "c")] * 2, "test": [("a", "c")] * 2},
        classes=["c", "d"],
        how="",
    )
    config = TrainConfig(strategy="lp-ft", epochs=2)
    plan = make_plan(config, 2)
    plain = budget.disk_needs(model, config, data, plan, cache_side=40, feature_dim=10)
    kept = budget.disk_needs(model, config.replace(keep_top_k=3), data, plan, cache_side=40, feature_dim=10)
    state = (10 * 10 + 10 + 10 * 2 + 2) * 4
    assert plain["run"]["last.ckpt x2 while replaced"] == 2 * 3 * state  # weights + AdamW's two moments
    assert kept["run"]["top 3 copies"] == 3 * state
    assert plain["cache"] == {"decoded images": 12 * 40 * 40 * 3, "backbone features": 12 * 10 * 4}
