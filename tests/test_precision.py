"""precision auto: fp32 without native bf16; with it, the faster side per kind of work, timed once and cached.

Both branches run on every CPU: $TRANSFERKIT_CPU_BF16 overrides the flag detection, and bf16 autocast
runs (emulated) where the CPU lacks it.
"""

import json

import pytest
import torch

import transferkit
from transferkit.models import precision
from transferkit.models.classifier import build_classifier

CPU = torch.device("cpu")
MEASURE = precision.measure  # the real probe, even where `make test-bf16` replaces it for the session


@pytest.fixture
def workload():
    model, _, _ = build_classifier("efficientnet_lite0", "auto", 2, img_size=32)
    return precision.Workload(model, "efficientnet_lite0 3ch", (4, 3, 32, 32))


def _never(*_):
    raise AssertionError("measured, but nothing should have been timed")


def test_auto_is_fp32_without_native_bf16_and_times_nothing(monkeypatch, workload, tmp_path):
    monkeypatch.setenv("TRANSFERKIT_CPU_BF16", "0")
    monkeypatch.setattr(precision, "measure", _never)
    for kind in precision.KINDS:
        choice = precision.choose("auto", CPU, kind, workload, tmp_path / "p.json")
        assert choice.precision == "fp32"
        assert "without native bf16" in choice.reason
    assert precision.choose("bf16", CPU, "train", workload).precision == "bf16"  # asked for: emulated, allowed
    assert not (tmp_path / "p.json").exists()


def test_native_bf16_takes_the_faster_side_of_each_kind_once(monkeypatch, workload, tmp_path):
    monkeypatch.setenv("TRANSFERKIT_CPU_BF16", "1")
    # the Zen 4 figures of issue 13: inference 2.7x faster in bf16, lite0's fine-tune step 0.75x
    speeds = {"infer": {"fp32": 267.0, "bf16": 730.0}, "train": {"fp32": 150.0, "bf16": 113.0}}
    calls = []
    monkeypatch.setattr(precision, "measure", lambda w, kind: calls.append(kind) or speeds[kind])
    cache = tmp_path / "p.json"
    infer = precision.choose("auto", CPU, "infer", workload, cache)
    train = precision.choose("auto", CPU, "train", workload, cache)
    assert (infer.precision, train.precision) == ("bf16", "fp32")
    assert "bf16 730 img/s, fp32 267 img/s (2.73x" in infer.reason
    assert "(0.75x" in train.reason
    assert calls == ["infer", "train"]
    assert len(json.loads(cache.read_text())) == 2
    monkeypatch.setattr(precision, "measure", _never)  # the same machine, model and size: from the cache
    assert precision.choose("auto", CPU, "infer", workload, cache) == infer
    assert precision.choose("auto", CPU, "train", workload, cache) == train
    # just under the bar stays fp32: noise and bf16 rounding are not worth a few percent
    monkeypatch.setattr(precision, "measure", lambda w, kind: {"fp32": 100.0, "bf16": 114.0})
    other = precision.Workload(workload.model, "other", workload.shape)
    assert precision.choose("auto", CPU, "infer", other, cache).precision == "fp32"


def test_the_probe_times_both_precisions_on_a_copy(workload):
    """...and leaves the random streams where they were: on an AMD Zen 5 (avx512_bf16) the run that measured
    drew other dropout masks than the runs that read the timings; and the user's hooks (a copy keeps them)
    never see the probe's passes."""
    before = {k: v.clone() for k, v in workload.model.state_dict().items()}
    calls = []
    workload.model.head.register_forward_hook(lambda *_: calls.append("forward"))
    workload.model.head.register_forward_pre_hook(lambda *_: calls.append("pre"))
    workload.model.head.register_full_backward_hook(lambda *_: calls.append("backward"))
    workload.model.train()  # dropout draws: the train probe runs the model as training does
    for kind in precision.KINDS:
        torch.manual_seed(0)
        speeds = MEASURE(workload, kind, reps=1)
        drawn = torch.rand(4)
        torch.manual_seed(0)
        assert torch.equal(drawn, torch.rand(4)), kind
        assert set(speeds) == {"fp32", "bf16"}
        assert all(v > 0 for v in speeds.values())
    after = workload.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched too
    assert all(p.grad is None for p in workload.model.parameters())
    assert calls == []


def test_the_probe_copies_the_model_without_the_users_hooks_but_with_spectral_norms():
    import threading

    from torch import nn

    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)), nn.Linear(4, 2)).eval()  # as built: no pass yet

    class Counter:  # a hook bound to an object that cannot be deep-copied (a bound method copies its object)
        def __init__(self):
            self.lock, self.calls = threading.Lock(), 0

        def hook(self, *_):
            self.calls += 1

    counter = Counter()
    model[1].register_forward_hook(counter.hook)
    copied = precision._copy_without_hooks(model)
    x = torch.randn(3, 4)
    torch.testing.assert_close(copied(x), model(x))  # spectral_norm's pre-hook still makes the weight
    assert counter.calls == 1  # the model's own call only


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_run_records_what_auto_chose_and_why(monkeypatch, shapes_dir, tiny, native):
    """A real run, with the probe really timing both precisions (emulated bf16 where not native)."""
    monkeypatch.setenv("TRANSFERKIT_CPU_BF16", native)
    run = transferkit.train(data=str(shapes_dir), strategy="finetune", name=f"auto{native}", **tiny)
    setting = json.loads((run.dir / "runtime.json").read_text())
    assert run.metrics["runtime"]["precision"] == setting["precision"]
    table = (
        json.loads((precision_cache := transferkit.core.machine.cache_root() / "precision.json").read_text())
        if native == "1"
        else {}
    )
    for kind in precision.KINDS:
        reason = setting["precision_reason"][kind]
        if native == "0":
            assert setting["precision"][kind] == "fp32"
            assert "without native bf16" in reason
            continue
        # the choice is the faster side of what was timed, as cached for this CPU, model and size
        (speeds,) = [v for k, v in table.items() if f" {kind} 8x3x32x32" in k and "efficientnet_lite0 3ch" in k]
        faster = speeds["bf16"] >= precision.FASTER_BY * speeds["fp32"]
        assert setting["precision"][kind] == ("bf16" if faster else "fp32"), (kind, speeds, precision_cache)
        assert reason.startswith("measured here")


def test_a_linear_probe_trains_at_inference_precision(monkeypatch, shapes_dir, tiny):
    monkeypatch.setenv("TRANSFERKIT_CPU_BF16", "0")
    run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", **tiny)
    reasons = json.loads((run.dir / "runtime.json").read_text())["precision_reason"]
    assert reasons["train"] == "only the head trains: as inference"


@pytest.mark.parametrize("strategy", ["finetune", "linear-probe"])
def test_bf16_asked_for_trains_and_evaluates_in_bf16_on_any_cpu(shapes_dir, tiny, strategy):
    run = transferkit.train(
        data=str(shapes_dir),
        strategy=strategy,
        precision="bf16",
        epochs=2,
        **{k: v for k, v in tiny.items() if k != "epochs"},
    )
    setting = json.loads((run.dir / "runtime.json").read_text())
    assert setting["precision"] == {"train": "bf16", "infer": "bf16"}
    assert setting["precision_reason"] == {"train": "asked for", "infer": "asked for"}
    clf = transferkit.load(run.dir, precision="bf16")
    assert clf.precision == "bf16"
    result = transferkit.evaluate(run.dir, precision="bf16")
    assert result["precision"] == "bf16"
    assert result["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"])  # train's test pass, also bf16
    probs = clf.predict_proba(sorted(str(p) for p in (shapes_dir / "circle").glob("*.png")))
    assert probs.dtype == "float32"
    assert abs(probs.sum(1) - 1).max() < 1e-3


def test_serving_in_bf16_needs_the_bundles_own_agreement_check():
    fast = precision.Choice("bf16", "measured here: bf16 730 img/s, fp32 267 img/s (2.73x; bf16 when >= 1.15x)")
    assert precision.for_serving(fast, None).precision == "fp32"  # never checked
    low = precision.for_serving(fast, {"bf16_top1_agreement": 0.97, "images": 200})
    assert low.precision == "fp32"
    assert "97.0% of 200 images" in low.reason
    ok = precision.for_serving(fast, {"bf16_top1_agreement": 0.999, "images": 1000})
    assert ok.precision == "bf16"
    assert "99.9% of 1000" in ok.reason
    asked = precision.Choice("bf16", "asked for")
    assert precision.for_serving(asked, None) == asked
    slow = precision.Choice("fp32", "CPU without native bf16 (avx512_bf16/AMX): emulated bf16 is slower")
    assert precision.for_serving(slow, {"bf16_top1_agreement": 1.0, "images": 9}) == slow


def test_a_run_in_bf16_checks_its_model_against_fp32_and_predict_follows_the_check(
    monkeypatch, shapes_dir, tiny, tmp_path
):
    run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", precision="bf16", **tiny)
    checked = run.metrics["precision_check"]
    n = sum(len(json.loads((run.dir / "split.json").read_text())["splits"][s]) for s in ("val", "test"))
    assert checked["images"] == n
    # the agreement recomputed here: predict's top-1 answers on those images in fp32 and in bf16
    split = json.loads((run.dir / "split.json").read_text())["splits"]
    paths = [ref for s in ("val", "test") for ref, _ in split[s]]
    answers = [transferkit.load(run.dir, precision=p).predict_proba(paths).argmax(1) for p in ("fp32", "bf16")]
    assert checked["bf16_top1_agreement"] == pytest.approx((answers[0] == answers[1]).mean())
    assert transferkit.deploy.bundle.load_bundle(run.dir)[1]["precision"] == checked
    # a machine where bf16 inference measures 2.7x faster serves this bundle in bf16 only if it passed
    monkeypatch.setenv("TRANSFERKIT_CPU_BF16", "1")
    monkeypatch.setattr(precision, "measure", lambda w, kind: {"fp32": 267.0, "bf16": 730.0})
    # its own precision cache: on a CPU with native bf16 an earlier test's real probe of the same model and
    # size is cached in the session's, and its timings (under 1.15x in one CI run) would decide instead
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    served = transferkit.load(run.dir).precision
    assert served == ("bf16" if checked["bf16_top1_agreement"] >= precision.AGREEMENT else "fp32")
    fp32_run = transferkit.train(data=str(shapes_dir), strategy="linear-probe", precision="fp32", name="f", **tiny)
    assert fp32_run.metrics["precision_check"] == {"train": "fp32", "infer": "fp32"}
    assert transferkit.load(fp32_run.dir).precision == "fp32"  # never checked: not served in bf16
    assert transferkit.load(fp32_run.dir, precision="bf16").precision == "bf16"  # asked for


def test_the_serving_check_runs_fp32_again_and_reuses_the_bf16_logits_the_run_computed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images = torch.randn(8, 3, 2, 2)
    with torch.no_grad():
        known = model(images).numpy()
    known[[1, 6]] = -known[[1, 6]]  # the run's "bf16" top-1 differs from fp32 on rows 1 and 6
    loader = [(images[:5], None, torch.arange(5)), (images[5:], None, torch.arange(5, 8))]
    assert precision.agreement_counts(model, [(loader, known)], lambda x: x) == (6, 8)
    shuffled = [(images[[4, 1, 0]], None, torch.tensor([4, 1, 0]))]  # rows found by the loader's index
    assert precision.agreement_counts(model, [(shuffled, known)], lambda x: x) == (2, 3)
    assert precision.agreement_counts(model, [(loader, None)], lambda x: x)[1] == 8  # no logits: bf16 runs here
