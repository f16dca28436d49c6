"""`transferkit inspect MODEL`: what a backbone looks like to transferkit, without training it.

Layer groups (timm's group_matcher) with their parameter counts, which groups each strategy
trains with the default config, the pooled feature width, the pretrained preprocessing, and
whether weights for it exist on this machine (bundled with a package, in the torch hub or HF cache).
"""

from __future__ import annotations

from transferkit.core.config import STRATEGIES, TrainConfig


def describe(name: str, img_size: int | None = None) -> dict:
    from transferkit.core.errors import UserError
    from transferkit.models.classifier import build_classifier, layer_groups
    from transferkit.models.weights import locate_weights, resolve_arch
    from transferkit.training.strategy import make_plan

    if img_size is not None and img_size < 16:
        raise UserError(f"--img-size must be 16 or more; got {img_size}.")
    try:  # built as training would build it: with the weights found here (their tag and preprocessing)
        found = locate_weights(resolve_arch(name), "auto")
    except UserError:  # none on this machine: the architecture alone
        found = None
    model, record, prep = build_classifier(name, "auto" if found else "none", 2, img_size=img_size)
    arch = record["arch"]
    groups = layer_groups(model.backbone)
    params = dict(model.backbone.named_parameters())
    sizes = [sum(params[n].numel() for n in group) for group in groups]
    config = TrainConfig(model=name)
    plans = {}
    for strategy in STRATEGIES:
        plan = make_plan(config.replace(strategy=strategy), len(groups))
        plans[strategy] = [{"phase": p.name, "epochs": p.epochs, "groups": p.groups, "bn": p.bn} for p in plan]
    return {
        "model": name,
        "arch": arch,
        "features": record["features"],
        "preprocessing": prep.to_dict(),
        "groups": [
            {"index": i, "params": n, "first": g[0], "last": g[-1]} for i, (g, n) in enumerate(zip(groups, sizes))
        ],
        "head_params": sum(p.numel() for p in model.head.parameters()),
        "plans": plans,
        "weights_here": str(found.path) if found else None,
    }
