"""Domain adaptation: the gradient reversal, the losses, an adapted run's target metrics, and proof that
--target-eval labels never reach training."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import make_folder

import transferkit
from transferkit.core.errors import UserError
from transferkit.evaluation.domain import mean_entropy, pca_2d, proxy_a_distance
from transferkit.training.adapt import GradientReverse, class_confusion, coral, reversal_coefficient


def test_gradient_reversal_flips_the_gradient_by_the_scheduled_coefficient():
    x = torch.randn(5, 3, requires_grad=True)
    for progress in (0.0, 0.1, 0.5, 1.0):
        coefficient = reversal_coefficient(progress)
        x.grad = None
        (GradientReverse.apply(x, coefficient) * torch.arange(3.0)).sum().backward()
        assert torch.allclose(x.grad, -coefficient * torch.arange(3.0).expand(5, 3))
    assert reversal_coefficient(0.0) == 0.0 and reversal_coefficient(1.0) == pytest.approx(0.99991, abs=1e-5)
    assert reversal_coefficient(0.3) < reversal_coefficient(0.6)
    assert torch.equal(GradientReverse.apply(x, 0.7), x)  # the forward is the identity


def test_mcc_and_coral_are_zero_where_there_is_nothing_to_align():
    confident = torch.eye(4) * 50  # each sample sure of its own class: no confusion between classes
    assert float(class_confusion(confident)) == pytest.approx(0.0, abs=1e-6)
    assert float(class_confusion(torch.zeros(4, 4))) > 0.5  # uniform predictions: all confusion
    features = torch.randn(16, 6)
    assert float(coral(features, features)) == pytest.approx(0.0, abs=1e-9)
    assert float(coral(features, 3 * features)) > 0


def test_the_label_free_measures():
    assert mean_entropy(np.zeros((3, 10))) == pytest.approx(math.log(10))  # uniform: the most uncertain
    assert mean_entropy(np.eye(4) * 100) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    same = rng.normal(size=(400, 8))
    assert proxy_a_distance(same[:200], same[200:]) < 0.3  # one distribution: cannot be told apart
    assert proxy_a_distance(same[:200], same[200:] + 3.0) > 1.9  # far apart: always told apart
    assert proxy_a_distance(same[:5], same[5:]) is None
    source, target = pca_2d(same[:50], same[50:] + 1.0)
    assert source.shape == (50, 2) and target.shape == (350, 2)


@pytest.fixture
def domains(tmp_path):
    """A labelled source (shapes, seed 0), an unlabelled target folder (other shapes, seed 1, no class
    folders) and that target's labels (class folders) for measuring."""
    source = make_folder(tmp_path / "source", per_class=8, size=32, seed=0)
    labelled = make_folder(tmp_path / "labelled", per_class=6, size=32, seed=1)
    target = tmp_path / "target"
    for file in labelled.rglob("*.png"):
        (target / "nested").mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target / "nested" / f"{file.parent.name}-{file.name}")
    return source, target, labelled


def run(tmp_path, source, name, **overrides):
    return transferkit.train(
        **{
            "data": str(source),
            "img_size": 32,
            "epochs": 2,
            "batch_size": 8,
            "workers": 0,
            "quiet": True,
            "html_report": False,
            "precision": "fp32",
            "runs_dir": str(tmp_path / "runs"),
            "name": name,
            **overrides,
        }
    )


@pytest.mark.parametrize(
    "method,strategy,head",
    [
        ("dann-mcc", "finetune", "linear"),
        ("cdan", "lp-ft", "linear"),
        ("mcc", "linear-probe", "bottleneck"),
        ("coral", "full", "mlp"),
    ],
)
def test_an_adapted_run_records_target_metrics_and_ships_a_normal_bundle(tmp_path, domains, method, strategy, head):
    """Each method with a strategy: a frozen backbone adapts its trainable bottleneck (linear-probe)."""
    source, target, labelled = domains
    done = run(
        tmp_path,
        source,
        method,
        target=str(target),
        target_eval=str(labelled),
        adapt=method,
        strategy=strategy,
        head=head,
        head_hidden=16,
    )
    rows = [json.loads(line) for line in (done.dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= row["target_accuracy"] <= 1.0 and row["adapt_loss"] > 0
        assert (row["domain_accuracy"] is not None) == (method in ("dann-mcc", "cdan"))
        assert 0.0 <= row["target_entropy"] <= math.log(2) + 1e-6
        assert row["proxy_a_distance"] is None  # 2 source val images: too few to tell the domains apart
    state = torch.load(done.dir / "last.ckpt", weights_only=False)
    assert state["terms"][0]["_extra_state"] == {"step": 2 * 2}  # 16 source images, batches of 8, 2 epochs
    predictions = transferkit.load(done.best).predict([str(next(target.rglob("*.png")))])
    assert predictions[0]["label"] in ("circle", "square")
    if head == "bottleneck":  # its BatchNorm exports and matches PyTorch like any head
        from transferkit.deploy.export import export

        assert export(done.dir, format="onnx")["top1_agreement"] == 1.0


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, _seed = key
        return self.images[index], 0, index


def test_each_method_adapts_a_compiled_backbone_through_the_objective():
    """Adaptation reads the pre-logit features from the model explicitly (no hooks), so it works on a
    compiled backbone: the same loss as eager, and the discriminator gets its gradient."""
    from transferkit.data.sampling import EpochSampler, StepBatches
    from transferkit.models.classifier import Classifier, make_head
    from transferkit.models.objective import Classification
    from transferkit.training.adapt import Adaptation

    target = torch.utils.data.DataLoader(_Images(torch.randn(8, 12)), batch_sampler=StepBatches(EpochSampler(8, 0), 4))
    inputs, labels = torch.randn(4, 12), torch.tensor([0, 1, 2, 0])
    for method in ("dann", "cdan", "mcc", "coral"):
        losses = []
        for compiled in (False, True):
            torch.manual_seed(0)
            backbone = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU())
            model = Classifier(backbone, make_head(16, 3, "linear", 0, 0))
            adaptation = Adaptation(method, 16, 3, target, lambda images: images, 1.0, 10)
            objective = Classification(model, torch.nn.CrossEntropyLoss(), terms=(adaptation,))
            if compiled:
                model.backbone.compile()
            out = objective(inputs, labels)
            out.loss.backward()
            losses.append(out.loss.item())
            assert all(p.grad is not None for p in model.backbone.parameters())
            if adaptation.discriminator is not None:
                assert all(p.grad is not None for p in adaptation.discriminator.parameters())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), method


@pytest.mark.slow
def test_a_target_trains_with_compile(tmp_path, domains):
    """The whole command: --target with --compile trains, and equals the eager run (about 2 minutes on a
    2-core CPU, most of it compiling)."""
    source, target, _ = domains
    common = {"target": str(target), "adapt": "dann", "strategy": "linear-probe", "epochs": 1, "feature_cache": False}
    eager = run(tmp_path, source, "eager", **common)
    compiled = run(tmp_path, source, "compiled", compile=True, **common)
    rows = {
        name: json.loads((done.dir / "metrics.jsonl").read_text().splitlines()[-1])
        for name, done in (("eager", eager), ("compiled", compiled))
    }
    assert rows["compiled"]["domain_accuracy"] is not None
    assert rows["compiled"]["train_loss"] == pytest.approx(rows["eager"]["train_loss"], rel=1e-4)
    assert rows["compiled"]["adapt_loss"] == pytest.approx(rows["eager"]["adapt_loss"], rel=1e-4)
    state = torch.load(compiled.dir / "last.ckpt", weights_only=True)
    assert state["terms"][0]["_extra_state"] == {"step": 2}


def test_select_target_entropy_keeps_the_most_confident_epoch_on_the_target(tmp_path, domains):
    """The label-free rule picks the epoch of lowest target entropy; the report shows the pick, the oracle
    and the features before and after; a bottleneck head is what the adaptation aligns."""
    source, target, labelled = domains
    done = run(
        tmp_path,
        source,
        "entropy",
        target=str(target),
        target_eval=str(labelled),
        adapt="mcc",
        epochs=3,
        select="target-entropy",
        head="bottleneck",
        head_hidden=16,
        html_report=True,
    )
    rows = [json.loads(line) for line in (done.dir / "metrics.jsonl").read_text().splitlines()]
    assert done.metrics["select"] == "target-entropy"
    assert done.metrics["best"]["epoch"] == min(rows, key=lambda r: r["target_entropy"])["epoch"]
    points = json.loads((done.dir / "adapt-features.json").read_text())
    assert set(points) == {"before", "after"} and np.asarray(points["after"]["source"]).shape[1] == 2
    page = (done.dir / "report.html").read_text()
    assert "Domain adaptation" in page and "oracle pick" in page
    with pytest.raises(UserError, match="select 'target-entropy' .* add --target"):
        run(tmp_path, source, "no-target", select="target-entropy")


def test_target_eval_labels_never_reach_training(tmp_path, domains):
    """Poison the measuring labels (swap the class folders): the weights come out identical."""
    source, target, labelled = domains
    poisoned = tmp_path / "poisoned"
    (poisoned / "circle").mkdir(parents=True)
    shutil.copytree(labelled / "circle", poisoned / "square")
    shutil.copytree(labelled / "square", poisoned / "circle", dirs_exist_ok=True)
    runs = {
        name: run(tmp_path, source, name, target=str(target), target_eval=str(folder), adapt="dann", deterministic=True)
        for name, folder in (("honest", labelled), ("poisoned", poisoned))
    }
    weights = {name: torch.load(r.dir / "last.ckpt", weights_only=False)["model"] for name, r in runs.items()}
    assert all(torch.equal(weights["honest"][k], weights["poisoned"][k]) for k in weights["honest"])
    rows = {
        name: [json.loads(line) for line in (r.dir / "metrics.jsonl").read_text().splitlines()]
        for name, r in runs.items()
    }
    for honest, bad in zip(rows["honest"], rows["poisoned"]):  # the same model, measured on swapped labels
        assert honest["val_accuracy"] == bad["val_accuracy"]
        assert honest["target_accuracy"] + bad["target_accuracy"] == pytest.approx(1.0)


def test_bad_targets_are_refused_or_warned(tmp_path, domains, capsys):
    source, target, labelled = domains
    with pytest.raises(UserError, match="needs unlabelled target images: add --target"):
        run(tmp_path, source, "no-target", adapt="dann")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="has no usable images"):
        run(tmp_path, source, "empty", target=str(tmp_path / "empty"))
    extra = make_folder(tmp_path / "extra", per_class=2, size=32)
    shutil.copytree(extra / "circle", extra / "triangle")
    with pytest.raises(UserError, match="'triangle' that the source lacks"):
        run(tmp_path, source, "extra", target=str(target), target_eval=str(extra))
    (target / "broken.jpg").write_bytes(b"not a jpeg")
    done = run(tmp_path, source, "broken", target=str(target), epochs=1)
    assert "broken.jpg" in (done.dir / "target-skipped.txt").read_text()  # skipped and listed, as for a source
    run(tmp_path, source, "same", target=str(source), epochs=1)
    assert "every target image of" in capsys.readouterr().err


def test_evaluate_scores_any_labelled_folder(tmp_path, domains):
    source, target, labelled = domains
    done = run(tmp_path, source, "plain", epochs=1)
    metrics = transferkit.evaluate(done.dir, data=str(labelled))
    assert metrics["n"] == 12 and metrics["split"] == str(labelled) and (done.dir / "eval_data.json").is_file()
    extra = make_folder(tmp_path / "extra", per_class=1, size=32)
    shutil.copytree(extra / "circle", extra / "triangle")
    with pytest.raises(UserError, match="--data .* has class\\(es\\) 'triangle'"):
        transferkit.evaluate(done.dir, data=str(extra))


def test_two_processes_adapt_what_one_adapts(tmp_path, domains):
    """DDP: the target loader is sharded like the source and the discriminator's gradients are averaged over
    the ranks. A frozen backbone (linear-probe: BatchNorm in eval mode) with a linear head makes each image's
    loss independent of how the batch is split, so 1 and 2 processes must agree, discriminator included."""
    import subprocess

    from helpers import assert_same_weights, torchrun

    source, target, _ = domains
    flags = [
        "--strategy",
        "linear-probe",
        "--adapt",
        "dann",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--optimizer",
        "sgd",
        "--img-size",
        "32",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--quiet",
        "--no-report",
        "--no-feature-cache",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--target",
        str(target),
    ]
    one = run(
        tmp_path,
        source,
        "one",
        strategy="linear-probe",
        adapt="dann",
        batch_size=8,
        lr=1e-2,
        optimizer="sgd",
        target=str(target),
        feature_cache=False,
        device="cpu",
    )
    out = subprocess.run(torchrun(str(source), "--name", "two", *flags), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    states = [torch.load(folder / "last.ckpt", weights_only=False) for folder in (one.dir, tmp_path / "runs" / "two")]
    assert_same_weights(states[0]["model"], states[1]["model"], atol=1e-5)
    discriminators = [{k: v for k, v in s["terms"][0].items() if k.startswith("discriminator.")} for s in states]
    assert len(discriminators[0]) == 6  # three linear layers
    assert_same_weights(discriminators[0], discriminators[1], atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["domain_accuracy"] is not None for r in rows)
