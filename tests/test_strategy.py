import pytest
import torch

from transferkit.model import build_classifier, layer_groups
from transferkit.strategy import apply_phase, make_plan, param_groups, set_train_mode
from transferkit.loop import train


def _fresh_backbone_state():
    model, _, _ = build_classifier("efficientnet_lite0", "auto", 2, img_size=32)
    return model, {k: v.clone() for k, v in model.backbone.state_dict().items()}


def _group_of(key: str, groups: list[list[str]]) -> int:
    """Layer group of a parameter or buffer (buffers follow their module's weight)."""
    module = key.rsplit(".", 1)[0]
    for i, names in enumerate(groups):
        if key in names or any(n.rsplit(".", 1)[0] == module for n in names):
            return i
    raise KeyError(key)


def _trained_backbone(run_dir):
    state = torch.load(run_dir / "last.ckpt", weights_only=True)["model"]
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def test_linear_probe_leaves_every_backbone_tensor_bit_identical(shapes_dir, tiny):
    _, before = _fresh_backbone_state()
    run = train(data=str(shapes_dir), strategy="linear-probe", **tiny)
    after = _trained_backbone(run.dir)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # weights, BN running stats and counters alike
    head_before = build_classifier("efficientnet_lite0", "auto", 2, img_size=32)[0].head
    assert run.metrics["trainable_params"] == sum(p.numel() for p in head_before.parameters())


def test_finetune_changes_exactly_the_chosen_groups(shapes_dir, tiny):
    model, before = _fresh_backbone_state()
    groups = layer_groups(model.backbone)
    run = train(data=str(shapes_dir), strategy="finetune", unfreeze_groups=2, **tiny)
    after = _trained_backbone(run.dir)
    chosen = {len(groups) - 2, len(groups) - 1}
    for key in before:
        if key.endswith("num_batches_tracked"):
            continue
        same = torch.equal(before[key], after[key])
        if _group_of(key, groups) in chosen:
            assert not same, f"{key} is in a training group but did not change"
        else:
            assert same, f"{key} is in a frozen group but changed"


@pytest.mark.parametrize("strategy,expected", [
    ("linear-probe", []), ("finetune", [5, 6, 7]), ("full", list(range(8))), ("scratch", list(range(8)))])
def test_plans_name_the_training_groups(strategy, expected):
    plan = make_plan(strategy, n_groups=8, epochs=4, unfreeze_groups=3)
    assert [p.groups for p in plan] == [expected] and plan[0].epochs == 4


def test_frozen_groups_stay_in_eval_mode_and_optimizer_sees_only_trainable():
    model, _ = _fresh_backbone_state()
    groups = layer_groups(model.backbone)
    phase = make_plan("finetune", len(groups), 1, unfreeze_groups=1, backbone_lr_mult=0.1)[0]
    apply_phase(model, groups, phase)
    set_train_mode(model, phase)
    assert not model.backbone.bn1.training and not model.backbone.blocks[0].training
    assert model.backbone.bn2.training and model.head.training
    pg = param_groups(model, phase, lr=1.0, weight_decay=0.05)
    optimized = {id(p) for g in pg for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable
    for g in pg:
        assert all(p.ndim > 1 for p in g["params"]) if g["weight_decay"] else all(p.ndim <= 1 for p in g["params"])
    assert {g["lr"] for g in pg} == {1.0, 0.1}
