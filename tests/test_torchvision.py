"""torchvision's classic classifiers by their names, with torchvision's weights from the torch hub cache: the
backbone computes what torchvision's own model computes with those weights."""

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import transferkit
from transferkit.core.errors import UserError
from transferkit.deploy.export import export
from transferkit.models.classifier import build_classifier, layer_groups
from transferkit.models.tvmodels import (
    CLASSICS,
    tagged,
    torchvision_file,
    torchvision_files,
    torchvision_preprocessing,
    torchvision_weights,
)

FAMILIES = (
    "resnet18",
    "densenet121",
    "vgg11",
    "inception_v3",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
)
BUILT_WITH_WEIGHTS = {"inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False}}
"""What torchvision's builder sets when it is given weights: inception_v3 renormalises its input inside."""


def _features_of(model: torch.nn.Module) -> torch.nn.Module:
    """torchvision's model with its 1000-class layer (the last Linear) replaced by Identity: what it feeds that
    layer."""
    name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, torch.nn.Identity())
    return model


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache of this test ($TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def _torchvision_in_cache(name: str, folder, version: int = -1):
    """torchvision's model with seeded random weights, saved as torchvision's download would be."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **BUILT_WITH_WEIGHTS.get(name, {})).eval()
    for module in model.modules():  # BN statistics and affine away from 0/1, so a wrong mapping of them shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    file = folder / torchvision_files(name)[version]
    torch.save(model.state_dict(), file)
    return model, file


@pytest.mark.parametrize("name", FAMILIES)
def test_hub_cache_weights_give_torchvision_features(hub, name):
    """The same image through torchvision's model (its own transforms' normalisation) and through the backbone
    (the normalisation recorded for the run): the same features, within 1e-4."""
    reference, file = _torchvision_in_cache(name, hub)
    reference = _features_of(reference)
    model, record, prep = build_classifier(name, "auto", 10)
    version = torchvision_weights(name)[-1][0]
    assert record["weights"] == f"torch hub cache {file}"
    assert record["arch"] == tagged(CLASSICS[name].arch, version)
    transforms = torchvision.models.get_model_weights(name)[version].transforms()
    assert (prep.img_size, prep.resize, prep.interpolation) == (
        transforms.crop_size[0],
        transforms.resize_size[0],
        transforms.interpolation.value,
    )
    image = torch.rand(2, 3, prep.img_size, prep.img_size, generator=torch.Generator().manual_seed(1))

    def normalised(mean, std):
        return (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    with torch.no_grad():
        want = reference(normalised(transforms.mean, transforms.std))
        got = model.backbone.eval()(normalised(prep.mean, prep.std))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    groups = layer_groups(model.backbone)  # timm's group_matcher: partial freezing and layer-wise LR work on it
    assert len(groups) >= 4
    assert sum(map(len, groups)) == len(list(model.backbone.parameters()))


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", pytest.param("vgg16", marks=pytest.mark.slow), "inception_v3"]
)
def test_train_finds_torchvision_weights_and_says_where_they_are_missing(hub, shapes_dir, tiny, name, capsys):
    tiny = {**tiny, "quiet": False, "img_size": 80 if name == "inception_v3" else 32}  # inception: >= 75 px
    with pytest.raises(UserError, match=f"none of {torchvision_files(name)[-1]}.* in the torch hub cache {hub}"):
        transferkit.train(data=str(shapes_dir), model=name, **tiny)
    _, file = _torchvision_in_cache(name, hub)
    run = transferkit.train(data=str(shapes_dir), model=name, name="tv", **tiny)
    meta = json.loads((run.best / "model.json").read_text())
    assert meta["architecture"]["weights"] == f"torch hub cache {file}"
    assert f"{name} (torch hub cache {file})" in capsys.readouterr().err
    assert meta["architecture"]["arch"] == tagged(CLASSICS[name].arch, torchvision_weights(name)[-1][0])
    assert run.metrics["test"]["accuracy"] == pytest.approx(transferkit.evaluate(run.dir)["accuracy"])
    assert not any("AuxLogits" in key for key in load_file(str(run.best / "model.safetensors")))


@pytest.mark.slow
def test_inception_exports_to_onnx_without_its_auxiliary_head(hub, shapes_dir, tiny):
    _torchvision_in_cache("inception_v3", hub)
    run = transferkit.train(data=str(shapes_dir), model="inception_v3", **{**tiny, "img_size": 80})
    exported = export(run.dir, "onnx")  # raises if ONNX Runtime disagrees with PyTorch beyond 1e-4 (~15 s)
    assert exported["max_abs_logit_diff"] <= 1e-4
    assert exported["top1_agreement"] == 1.0


def test_the_newest_torchvision_weights_win_and_bring_their_transforms(hub):
    assert [v for v, _ in torchvision_weights("resnet50")] == ["IMAGENET1K_V1", "IMAGENET1K_V2"]
    assert torchvision_file("resnet50") is None
    for name in torchvision_files("resnet50"):
        (hub / name).write_bytes(b"")
    assert torchvision_file("resnet50") == (hub / "resnet50-11ad3fa6.pth", "IMAGENET1K_V2")
    assert torchvision_file("resnet50.tv_in1k") == (hub / "resnet50-0676ba61.pth", "IMAGENET1K_V1")
    v2 = torchvision_preprocessing("resnet50", "IMAGENET1K_V2")
    assert (v2["img_size"], round(224 / v2["crop_pct"])) == (224, 232)  # V2: resize 232, crop 224
    assert torchvision_file("resnet50.a1_in1k") is None
    assert torchvision_file("tv_mobilenet_v2") is None
    assert tagged("resnet50", "IMAGENET1K_V2") == "resnet50.tv2_in1k"
    assert (
        tagged("efficientnet_b0", "IMAGENET1K_V1") == "efficientnet_b0"
    )  # timm's efficientnet_b0 has no tag for torchvision's weights: the same architecture


def test_imagenet_downloads_torchvision_weights_into_the_hub_cache(hub, tmp_path, monkeypatch):
    """--weights imagenet for a name only torchvision has weights for fetches torchvision's URL (here a file:// URL)
    into the torch hub cache under torchvision's file name, checks its hash prefix, and uses it."""
    import hashlib

    from transferkit.models import tvmodels

    _, saved = _torchvision_in_cache("mobilenet_v3_small", tmp_path)
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()[:8]
    served = saved.rename(tmp_path / f"mobilenet_v3_small-{digest}.pth")
    monkeypatch.setattr(tvmodels, "torchvision_weights", lambda name: [("IMAGENET1K_V1", served.as_uri())])
    _, record, _ = build_classifier("mobilenet_v3_small", "imagenet", 3)
    assert record["weights"] == f"torch hub cache {hub / served.name}"
    assert (hub / served.name).is_file()
    bad = tmp_path / "mobilenet_v3_small-00000000.pth"
    bad.write_bytes(served.read_bytes())
    monkeypatch.setattr(tvmodels, "torchvision_weights", lambda name: [("IMAGENET1K_V1", bad.as_uri())])
    with pytest.raises(UserError, match="Could not download torchvision's weights for 'mobilenet_v3_small'"):
        build_classifier("mobilenet_v3_small", "imagenet", 3)
    urls = {v: (tmp_path / f"{v}.pth").as_uri() for v in ("IMAGENET1K_V1", "IMAGENET1K_V2")}
    for v in urls:
        (tmp_path / f"{v}.pth").write_bytes(served.read_bytes())
    monkeypatch.setattr(tvmodels, "torchvision_weights", lambda name: list(urls.items()))
    _, record, _ = build_classifier("mobilenet_v3_small.tv_in1k", "imagenet", 3)  # the tag picks the version
    assert record["weights"] == f"torch hub cache {hub / 'IMAGENET1K_V1.pth'}"


def test_a_torchvision_file_under_another_name_says_which_name_it_is_for(hub, tmp_path):
    _, file = _torchvision_in_cache("mobilenet_v2", tmp_path)
    with pytest.raises(UserError, match="torchvision's mobilenet_v2 weights: use --model mobilenet_v2"):
        build_classifier("mobilenetv2_100", str(file), 3)
    with pytest.raises(UserError, match="torchvision's mobilenet_v2 weights: use --model mobilenet_v2"):
        build_classifier("mobilenet_v3_small", str(file), 3)  # in-order families check the layout first


def test_torchvision_files_given_by_path_with_one_channel_sorted_keys_or_other_classes(hub, tmp_path):
    """--weights FILE: torchvision's file by its own name brings torchvision's transforms (as auto does), also
    for a 1-channel model; a torchvision-layout safetensors file (keys come back sorted) and a torchvision model
    fine-tuned for other classes load the same backbone."""
    from safetensors.torch import save_file

    reference, file = _torchvision_in_cache("mobilenet_v2", tmp_path)
    model, record, prep = build_classifier("mobilenet_v2", str(file), 3, in_chans=1)
    assert record["weights"] == f"file {file}"
    assert record["arch"] == "tv_mobilenet_v2.tv2_in1k"
    assert model.backbone.conv_stem.weight.shape[1] == 1
    assert len(prep.mean) == 1
    assert prep.resize == 232
    want = build_classifier("mobilenet_v2", str(file), 3)[0].backbone.state_dict()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "sorted.safetensors")
    reference.classifier[1] = torch.nn.Linear(1280, 7)
    torch.save(reference.state_dict(), tmp_path / "seven.pth")
    for other in ("sorted.safetensors", "seven.pth"):
        got = build_classifier("mobilenet_v2", str(tmp_path / other), 3)[0].backbone.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_tags_timm_does_not_have_are_named_with_the_ones_it_has(hub):
    with pytest.raises(UserError, match="no weights tagged 'tv2_in1k' for resnet18; its tags: .*tv_in1k"):
        build_classifier("resnet18.tv2_in1k", "none", 3)
    _torchvision_in_cache("resnet50", hub, version=0)  # only V1 here: resnet50.tv_in1k finds it, plain resnet50 too
    assert build_classifier("resnet50.tv_in1k", "auto", 3)[1]["arch"] == "resnet50.tv_in1k"


def test_unknown_names_suggest_the_torchvision_name():
    with pytest.raises(UserError, match="Did you mean 'mobilenet_v2'"):
        build_classifier("mobilenetv2", "none", 3)
