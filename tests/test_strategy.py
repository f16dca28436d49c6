import json

import pytest
import torch

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.models.classifier import build_classifier, layer_groups
from transferkit.training.recipe import train
from transferkit.training.strategy import apply_phase, group_lr_mults, make_plan, param_groups, set_train_mode


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


@pytest.mark.parametrize(
    "strategy,expected",
    [("linear-probe", []), ("finetune", [5, 6, 7]), ("full", list(range(8))), ("scratch", list(range(8)))],
)
def test_plans_name_the_training_groups(strategy, expected):
    plan = make_plan(TrainConfig(strategy=strategy, epochs=4, unfreeze_groups=3), n_groups=8)
    assert [p.groups for p in plan] == [expected] and plan[0].epochs == 4


def test_frozen_groups_stay_in_eval_mode_and_optimizer_sees_only_trainable():
    model, _ = _fresh_backbone_state()
    groups = layer_groups(model.backbone)
    phase = make_plan(TrainConfig(strategy="finetune", epochs=1, unfreeze_groups=1), len(groups))[0]
    apply_phase(model, groups, phase)
    set_train_mode(model, phase)
    assert not model.backbone.bn1.training and not model.backbone.blocks[0].training
    assert model.backbone.bn2.training and model.head.training
    pg = param_groups(model, groups, phase, lr=1.0, weight_decay=0.05)
    optimized = {id(p) for g in pg for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable
    for g in pg:
        assert all(p.ndim > 1 for p in g["params"]) if g["weight_decay"] else all(p.ndim <= 1 for p in g["params"])
    assert {g["lr"] for g in pg} == {1.0, 0.1}


def test_gradual_plan_unfreezes_one_group_from_the_top_every_n_epochs():
    plan = make_plan(TrainConfig(strategy="gradual", epochs=7, gradual_every=2), n_groups=3)
    assert [(p.groups, p.epochs) for p in plan] == [([], 2), ([2], 2), ([1, 2], 2), ([0, 1, 2], 1)]
    plan = make_plan(TrainConfig(strategy="gradual", epochs=6), n_groups=2)
    assert [(p.groups, p.epochs) for p in plan] == [([], 1), ([1], 1), ([0, 1], 4)]


def test_lp_ft_probes_then_fine_tunes_everything_at_a_lower_lr():
    lp, ft = make_plan(TrainConfig(strategy="lp-ft", epochs=5, lp_epochs=2, ft_lr_scale=0.05), n_groups=4)
    assert (lp.groups, lp.epochs, lp.bn) == ([], 2, "frozen")
    assert (ft.groups, ft.epochs, ft.lr_scale, ft.bn) == ([0, 1, 2, 3], 3, 0.05, "eval")
    with pytest.raises(UserError, match="lp_epochs must be >= 1 and <= 4"):
        TrainConfig(strategy="lp-ft", epochs=5, lp_epochs=5)


def test_layer_decay_and_fastai_slice_space_group_lrs_geometrically():
    phase = make_plan(TrainConfig(strategy="full", layer_decay=0.5), n_groups=3)[0]
    assert group_lr_mults(phase, 3) == [0.125, 0.25, 0.5]
    phase = make_plan(TrainConfig(strategy="full", lr=1e-2, lr_min=1e-5), n_groups=3)[0]
    lrs = [1e-2 * m for m in group_lr_mults(phase, 3)] + [1e-2]  # stem ... top group, head
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == 1e-2
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))


def test_explicit_plan_from_config():
    config = TrainConfig(
        plan=[{"epochs": 2, "groups": "none"}, {"epochs": 1, "groups": "top:2", "bn": "eval", "lr_scale": 0.5}]
    )
    a, b = make_plan(config, n_groups=5)
    assert (a.groups, a.bn, b.groups, b.bn, b.lr_scale) == ([], "frozen", [3, 4], "eval", 0.5)
    with pytest.raises(UserError, match="Unknown key 'epoch' in plan\\[0\\].*Did you mean 'epochs'"):
        make_plan(TrainConfig(plan=[{"epoch": 2, "epochs": 1}]), n_groups=5)


def test_gradual_run_trains_exactly_the_planned_groups_each_epoch(shapes_dir, tiny):
    run = train(data=str(shapes_dir), strategy="gradual", **{**tiny, "epochs": 4})
    plan = json.loads((run.dir / "plan.json").read_text())
    planned = [p["groups"] for p in plan for _ in range(p["epochs"])]
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    n = len(layer_groups(build_classifier("efficientnet_lite0", "auto", 2, img_size=32)[0].backbone))
    assert planned == [[], [n - 1], [n - 2, n - 1], [n - 3, n - 2, n - 1]]
    assert [r["groups"] for r in rows] == planned  # read off requires_grad during the run
