import pytest
import torch

import transferkit
from transferkit.models.classifier import build_classifier
from transferkit.training.regularize import L2SP


def _pretrained():
    return build_classifier("efficientnet_lite0", "auto", 2, img_size=32)[0]


def test_l2sp_is_zero_at_the_pretrained_weights_and_grows_with_distance():
    model = _pretrained()
    reg = L2SP(model.backbone, alpha=0.1)
    assert reg.penalty(model.backbone).item() == 0.0
    torch.manual_seed(0)
    noise = {n: torch.randn_like(p) for n, p in model.backbone.named_parameters()}
    norm2 = sum((v**2).sum().item() for v in noise.values())
    values = []
    for eps in (1e-3, 1e-2, 1e-1):
        with torch.no_grad():
            for n, p in model.backbone.named_parameters():
                p.copy_(reg.reference[n] + eps * noise[n])
        values.append(reg.penalty(model.backbone).item())
        assert values[-1] == pytest.approx(0.5 * 0.1 * eps**2 * norm2, rel=1e-3)
    assert values[0] < values[1] < values[2]


def _distance_from_pretrained(run_dir) -> float:
    reference = dict(_pretrained().backbone.named_parameters())
    state = torch.load(run_dir / "last.ckpt", weights_only=True)["model"]
    return sum(((state[f"backbone.{n}"] - p.detach()) ** 2).sum().item() for n, p in reference.items()) ** 0.5


def test_strong_l2sp_keeps_fine_tuned_weights_closer_to_pretrained(shapes_dir, tiny):
    common = {**tiny, "data": str(shapes_dir), "strategy": "full", "epochs": 3, "lr": 1e-2, "backbone_lr_mult": 1.0}
    free = transferkit.train(name="free", **common)
    held = transferkit.train(name="held", l2sp=50.0, **common)
    d_free, d_held = _distance_from_pretrained(free.dir), _distance_from_pretrained(held.dir)
    assert d_held < 0.7 * d_free, (d_free, d_held)


def test_mixup_cutmix_and_drop_path_train(shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="full", mixup=0.4, cutmix=1.0, drop_path=0.1, **tiny)
    assert run.metrics["test"]["n"] == 2
    rows = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and "NaN" not in rows[0]


def test_drop_path_reaches_the_backbone():
    model = build_classifier("efficientnet_lite0", "auto", 2, img_size=32, drop_path=0.2)[0]
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2, abs=0.03)  # timm ramps the rate up with depth
