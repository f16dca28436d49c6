import json

import numpy as np
import pytest
import torch
from PIL import Image

import transferkit
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.deploy.bundle import save_bundle
from transferkit.models.classifier import build_classifier
from transferkit.training.profile import WARMUP_STEPS, StepProfiler
from transferkit.training.recipe import STEPS


def test_run_directory_holds_everything(shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", **{**tiny, "epochs": 2})
    for name in (
        "config.yaml",
        "split.json",
        "classes.json",
        "plan.json",
        "metrics.jsonl",
        "metrics.json",
        "last.ckpt",
        "best/model.safetensors",
        "best/model.json",
        "runtime.json",
    ):
        assert (run.dir / name).is_file(), name
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["epoch_s"] > 0 and r["val_s"] > 0 for r in rows)
    config = TrainConfig.load(run.dir / "config.yaml")
    assert config.img_size == 32 and config.name == run.dir.name and config.strategy == "linear-probe"
    meta = json.loads((run.dir / "best" / "model.json").read_text())
    assert meta["classes"] == ["circle", "square"] == json.loads((run.dir / "classes.json").read_text())
    assert meta["strategy"]["plan"][0]["bn"] == "frozen"
    assert meta["preprocessing"]["img_size"] == 32 and meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["metrics"]["test"]["accuracy"] == run.metrics["test"]["accuracy"]
    test = run.metrics["test"]
    assert sum(map(sum, test["confusion_matrix"])) == test["n"] == 2
    runtime = json.loads((run.dir / "runtime.json").read_text())
    assert runtime == run.metrics["runtime"] and runtime["device"] == "cpu" and runtime["workers"] == 0
    steps = json.loads((run.dir / "metrics.json").read_text())["steps_s"]  # where the run's time went
    assert list(steps) == list(STEPS) and all(s >= 0 for s in steps.values()) and steps["train_phases"] > 0
    assert run.metrics["wall_time_s"] - 0.1 <= sum(steps.values()) <= run.metrics["wall_time_s"] + 0.01  # all of it
    ckpt = torch.load(run.dir / "last.ckpt", weights_only=True)  # plain tensors and values only
    assert ckpt["epoch"] == 2 and ckpt["config"]["data"] == str(shapes_dir)

    again = transferkit.evaluate(run.dir)
    assert again["accuracy"] == test["accuracy"] and again["confusion_matrix"] == test["confusion_matrix"]


def test_bundle_round_trip_gives_identical_logits(tmp_path):
    model, record, prep = build_classifier(
        "efficientnet_lite0", "auto", 3, img_size=32, head="mlp", head_hidden=16, head_dropout=0.2
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()  # also moves BN running stats away from the pretrained ones
    meta = {"architecture": record, "classes": ["a", "b", "c"], "preprocessing": prep.to_dict()}
    save_bundle(tmp_path / "bundle", model, meta)
    clf = transferkit.load(tmp_path / "bundle")
    model.eval().to(memory_format=torch.channels_last)  # as the Predictor runs it: same kernels, same bits
    with torch.no_grad():
        assert torch.equal(model(x), clf.model(x))


def test_predict_files_folders_and_arrays(shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", **tiny)
    clf = transferkit.load(run.best)
    files = sorted(str(p) for p in (shapes_dir / "circle").glob("*.png"))[:3]
    out = clf.predict(files, top_k=2)
    assert [r["input"] for r in out] == files
    for r in out:
        assert r["label"] in ("circle", "square") and len(r["top_k"]) == 2
        assert r["top_k"][0]["score"] >= r["top_k"][1]["score"]
        assert abs(sum(t["score"] for t in r["top_k"]) - 1) < 1e-5
    assert len(clf.predict(str(shapes_dir))) == 20
    arr = np.asarray(Image.open(files[0]))
    np.testing.assert_allclose(clf.predict_proba([arr]), clf.predict_proba([files[0]]), atol=1e-6)


def test_grayscale_stem_trains_and_reloads(shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="finetune", in_chans=1, head="mlp", **tiny)
    clf = transferkit.load(run.dir)
    assert clf.preprocessing.in_chans == 1 and len(clf.preprocessing.mean) == 1
    assert clf.model.backbone.conv_stem.weight.shape[1] == 1
    assert len(clf.predict(str(shapes_dir / "square"))) == 10


def test_run_names_never_clobber(shapes_dir, tiny):
    first = transferkit.train(data=str(shapes_dir), strategy="linear-probe", **tiny)
    second = transferkit.train(data=str(shapes_dir), strategy="linear-probe", **tiny)
    assert first.dir.name == "shapes-linear-probe" and second.dir.name == "shapes-linear-probe-2"
    with pytest.raises(UserError, match="already exists"):
        transferkit.train(data=str(shapes_dir), name="shapes-linear-probe", **tiny)


def test_textures_five_shot_transfer_beats_scratch(tmp_path):
    """Issue 2: 5-shot linear probe on real textures >= 0.95; scratch clearly lower."""
    common = {"data": "builtin:textures", "shots": 5, "runs_dir": str(tmp_path), "quiet": True}
    probe = transferkit.train(strategy="linear-probe", **common).metrics["test"]["accuracy"]
    scratch = transferkit.train(strategy="scratch", weights="none", **common).metrics["test"]["accuracy"]
    assert probe >= 0.95
    assert scratch < probe - 0.2


def test_demo_job_faces_defaults(tmp_path):
    """The `make demo` job: builtin:faces with every default, test accuracy >= 0.95 on 80 images."""
    run = transferkit.train(data="builtin:faces", runs_dir=str(tmp_path), quiet=True)
    assert run.metrics["test"]["n"] == 80
    assert run.metrics["test"]["accuracy"] >= 0.95


def test_early_stopping_ends_the_run_after_patience_epochs(shapes_dir, tiny):
    # an LR far below float resolution leaves the head unchanged: no epoch after the first improves
    run = transferkit.train(
        data=str(shapes_dir), strategy="linear-probe", lr=1e-20, augment="none", patience=2, **{**tiny, "epochs": 6}
    )
    assert run.metrics["epochs_run"] == 3 and run.metrics["best"]["epoch"] == 1


def test_profile_steps_write_the_operators_table_and_a_trace(shapes_dir, tiny):
    run = transferkit.train(data=str(shapes_dir), strategy="full", profile_steps=2, **{**tiny, "epochs": 2})
    text = (run.dir / "profile.txt").read_text()
    assert text.startswith("2 training steps after 2 warm-up steps") and "By their own CPU time:" in text
    assert "aten::" in text and "conv" in text  # the model's operators, by name
    trace = json.loads((run.dir / "profile-trace.json").read_text())
    assert any("aten::" in event.get("name", "") for event in trace["traceEvents"])
    with pytest.raises(UserError, match="profile_steps"):
        TrainConfig(profile_steps=-1)


def test_a_run_that_ends_before_its_profiled_steps_writes_what_was_recorded(tmp_path):
    said = []
    with StepProfiler(tmp_path, 100, torch.device("cpu"), said.append) as prof:
        for _ in range(WARMUP_STEPS + 3):
            torch.ones(4).add(1)
            prof.step()
    assert (tmp_path / "profile.txt").read_text().startswith("3 training steps") and "profile.txt" in said[0]
    prof.close()  # once only
    assert len(said) == 1
    with pytest.raises(ZeroDivisionError):  # a failing run: its own error, and the profiler stopped
        with StepProfiler(tmp_path / "failed", 100, torch.device("cpu"), said.append) as prof:
            for _ in range(WARMUP_STEPS + 1):
                prof.step()
            raise ZeroDivisionError
    with torch.profiler.profile():  # none left running: another can start
        pass
