import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from transferkit.core.errors import UserError
from transferkit.data.transforms import eval_transform
from transferkit.models.classifier import create_backbone, preprocessing_for
from transferkit.models.layouts import remap_ordered
from transferkit.models.weights import bundled_file, load_pretrained, locate_weights, read_state_dict

CAT_CLASSES = {281, 282, 283, 285}  # tabby, tiger cat, Persian, Egyptian cat


@pytest.mark.parametrize("size", [None, 96])
def test_bundled_lite0_is_imagenet_trained(size):
    from skimage.data import chelsea

    model, arch, found = create_backbone("efficientnet_lite0", "auto", 3, None)
    assert arch == "tf_efficientnet_lite0"
    assert str(found).startswith("bundled")
    prep = preprocessing_for(model, 3, size)
    assert prep.mean == (0.5, 0.5, 0.5)
    assert prep.std == (0.5, 0.5, 0.5)  # TF-style, from timm's config
    x = eval_transform(prep)(Image.fromarray(chelsea())).unsqueeze(0)
    with torch.no_grad():
        top1 = model.eval()(x).argmax(1).item()
    assert top1 in CAT_CLASSES


def test_in_chans_1_sums_the_pretrained_stem():
    rgb, _, _ = create_backbone("efficientnet_lite0", "auto", 3, None)
    gray, _, _ = create_backbone("efficientnet_lite0", "auto", 1, None)
    assert gray.conv_stem.weight.shape[1] == 1
    assert torch.allclose(gray.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))


def test_ordered_remap_checks_every_shape():
    path = bundled_file("tf_efficientnet_lite0")
    src = read_state_dict(path)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    remapped = remap_ordered(src, target, str(path))
    assert torch.equal(remapped["conv_stem.weight"], src["_conv_stem.weight"])
    src["_blocks.3._bn1.weight"] = torch.zeros(7)
    with pytest.raises(UserError, match="_blocks.3._bn1.weight .* does not fit"):
        remap_ordered(src, target, str(path))


class _Sentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_pickled_code_in_a_weights_file_is_refused(tmp_path):
    sentinel = tmp_path / "sentinel"
    bad = tmp_path / "evil.pth"
    torch.save({"model": _Sentinel(str(sentinel))}, bad)
    model = timm.create_model("test_efficientnet")
    with pytest.raises(UserError, match="pickled Python objects"):
        load_pretrained(model, "test_efficientnet", locate_weights("test_efficientnet", str(bad)), 3)
    assert not sentinel.exists()


def test_user_safetensors_with_another_head_loads_the_backbone(tmp_path):
    donor = timm.create_model("test_efficientnet", num_classes=7)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, tmp_path / "w.safetensors")
    model = timm.create_model("test_efficientnet")  # 1000-class head
    found = locate_weights("test_efficientnet", str(tmp_path / "w.safetensors"))
    load_pretrained(model, "test_efficientnet", found, 3)
    assert str(found) == f"file {tmp_path / 'w.safetensors'}"
    assert torch.equal(model.conv_stem.weight, donor.conv_stem.weight)


def test_weights_for_another_architecture_are_an_error(tmp_path):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "r.pth")
    with pytest.raises(UserError, match="do not match model 'test_efficientnet'"):
        load_pretrained(
            timm.create_model("test_efficientnet"),
            "test_efficientnet",
            locate_weights("test_efficientnet", str(tmp_path / "r.pth")),
            3,
        )


def test_auto_without_weights_says_how_to_get_them():
    with pytest.raises(UserError, match="--weights PATH.*--weights imagenet"):
        create_backbone("resnet50", "auto", 3, None)


def test_auto_finds_weights_in_the_hugging_face_cache(tmp_path):
    """A model downloaded earlier (here: a cache laid out by hand) trains offline with weights=auto."""
    repo = tmp_path / "hub" / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    torch.manual_seed(5)
    donor = timm.create_model("test_efficientnet")
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, snap / "model.safetensors")
    code = (
        "import torch, json; from transferkit.models.classifier import create_backbone;"
        "m, arch, src = create_backbone('test_efficientnet', 'auto', 3, None);"
        "print(json.dumps({'src': str(src), 'sum': m.conv_stem.weight.sum().item()}))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["src"].startswith("cache")
    assert result["sum"] == pytest.approx(donor.conv_stem.weight.sum().item(), rel=1e-6)
