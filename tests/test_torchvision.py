"""torchvision's classic classifiers by their names, with torchvision's weights from the torch hub cache: the
backbone computes what torchvision's own model computes with those weights."""

import json

import pytest
import torch
import torchvision

import transferkit
from transferkit.core.errors import UserError
from transferkit.models.classifier import build_classifier
from transferkit.models.weights import torchvision_files

FAMILIES = ("resnet18", "densenet121", "vgg11")


def _features_of(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """torchvision's model with its 1000-class layer replaced by Identity: what it passes to that layer."""
    if name.startswith("vgg"):
        model.classifier[6] = torch.nn.Identity()
    elif name.startswith("resnet"):
        model.fc = torch.nn.Identity()
    else:
        model.classifier = torch.nn.Identity()
    return model


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache of this test ($TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def _torchvision_in_cache(name: str, folder):
    """torchvision's model with seeded random weights, saved as torchvision's download would be."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for module in model.modules():  # BN statistics away from 0/1, so a wrong mapping of them shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    file = folder / torchvision_files(name)[-1][1]
    torch.save(model.state_dict(), file)
    return model, file


@pytest.mark.parametrize("name", FAMILIES)
def test_hub_cache_weights_give_torchvision_features(hub, name):
    reference, file = _torchvision_in_cache(name, hub)
    reference = _features_of(reference, name)
    model, record, prep = build_classifier(name, "auto", 10)
    assert record["weights"] == f"torch hub cache {file}" and record["arch"] == f"{name}.tv_in1k"
    assert (prep.img_size, prep.resize, prep.interpolation, prep.mean) == (224, 256, "bilinear", (0.485, 0.456, 0.406))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(x), model.backbone.eval()(x)
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4


def test_train_finds_torchvision_weights_and_says_where_they_are_missing(hub, shapes_dir, tiny):
    with pytest.raises(UserError, match="none of resnet18-f37072fd.pth in the torch hub cache"):
        transferkit.train(data=str(shapes_dir), model="resnet18", **tiny)
    _, file = _torchvision_in_cache("resnet18", hub)
    run = transferkit.train(data=str(shapes_dir), model="resnet18", name="tv", **tiny)
    meta = json.loads((run.best / "model.json").read_text())
    assert meta["architecture"]["weights"] == f"torch hub cache {file}"
    assert meta["architecture"]["arch"] == "resnet18.tv_in1k" and run.metrics["test"]["accuracy"] is not None


def test_the_newest_torchvision_weights_win_and_bring_their_transforms(hub):
    from transferkit.models.weights import torchvision_file, torchvision_preprocessing

    assert [v for v, _ in torchvision_files("resnet50")] == ["IMAGENET1K_V1", "IMAGENET1K_V2"]
    assert torchvision_file("resnet50") is None
    for _, name in torchvision_files("resnet50"):
        (hub / name).write_bytes(b"")
    assert torchvision_file("resnet50") == (hub / "resnet50-11ad3fa6.pth", "tv2_in1k")
    v2 = torchvision_preprocessing("resnet50.tv2_in1k")
    assert (v2["img_size"], round(224 / v2["crop_pct"])) == (224, 232)  # V2: resize 232, crop 224
    assert torchvision_file("resnet50.a1_in1k") is None and torchvision_file("mobilenet_v2") is None
