import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.core.config import TrainConfig
from transferkit.data.loaders import make_loader
from transferkit.data.sources import load_data
from transferkit.data.transforms import train_transform
from transferkit.models.classifier import build_classifier, layer_groups
from transferkit.models.runtime import Runtime
from transferkit.training.lrfind import lr_find
from transferkit.training.strategy import make_plan


def test_sweep_is_exponential_restores_weights_and_follows_the_stated_rule(shapes_dir):
    config = TrainConfig(data=str(shapes_dir), img_size=32, batch_size=8, workers=0, strategy="finetune")
    data = load_data(config.data)
    model, _, prep = build_classifier(config.model, "auto", 2, img_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = layer_groups(model.backbone)
    loader = make_loader(data, "train", train_transform(prep, "basic"), config, shuffle=True)
    result = lr_find(
        model,
        groups,
        make_plan(config, len(groups))[0],
        loader,
        torch.nn.CrossEntropyLoss(),
        config,
        Runtime(torch.device("cpu")),
        steps=30,
        start=1e-6,
        end=10.0,
    )
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert result.lrs[0] == pytest.approx(1e-6) and ratios == pytest.approx([ratios[0]] * len(ratios))
    best = min(range(len(result.smoothed)), key=result.smoothed.__getitem__)
    assert result.suggestion == pytest.approx(result.lrs[best] / 10)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_writes_plot_and_train_accepts_lr_auto(shapes_dir, tmp_path, tiny):
    out = CliRunner().invoke(
        app,
        [
            "lr-find",
            str(shapes_dir),
            "--img-size",
            "32",
            "--batch-size",
            "8",
            "--steps",
            "20",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
    )
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1e-8 < summary["suggested_lr"] < 1.0 and "minimum" in summary["rule"] and summary["steps"] == 20
    assert summary["plot"] == str(tmp_path / "runs" / "lr-find-shapes-finetune" / "lr_find.png")
    assert Image.open(summary["plot"]).size[0] > 100

    run = transferkit.train(data=str(shapes_dir), lr="auto", **tiny)
    assert isinstance(run.config.lr, float)
    assert TrainConfig.load(run.dir / "config.yaml").lr == run.config.lr
    assert (run.dir / "lr_find.png").is_file()
