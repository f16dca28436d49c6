import pickle

import numpy as np
import pytest
from conftest import make_folder
from PIL import Image

from transferkit.core.errors import UserError
from transferkit.data import builtin
from transferkit.data.sources import load_data, stratified_split


def test_flat_folders_get_a_stratified_seeded_split(tmp_path):
    root = make_folder(tmp_path / "d", per_class=20)
    a = load_data(str(root), seed=3)
    b = load_data(str(root), seed=3)
    c = load_data(str(root), seed=4)
    assert a.splits == b.splits
    assert a.splits != c.splits
    assert a.classes == ["circle", "square"]
    for split, n in (("train", 16), ("val", 2), ("test", 2)):
        assert a.counts(split) == {"circle": n, "square": n}
    all_refs = [r for s in a.splits.values() for r, _ in s]
    assert len(all_refs) == len(set(all_refs)) == 40


def test_train_val_test_folders_are_used_as_given(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3, splits=("train", "val", "test"))
    data = load_data(str(root))
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 6, "val": 6, "test": 6}
    assert all("/val/" in ref for ref, _ in data.splits["val"])


def test_missing_val_is_carved_from_train(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10, splits=("train", "test"))
    data = load_data(str(root), val_fraction=0.2)
    assert len(data.splits["val"]) == 4
    assert len(data.splits["train"]) == 16
    assert len(data.splits["test"]) == 20
    assert "val carved from train" in data.how


def test_val_class_unknown_to_train_is_an_error_naming_it(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2, splits=("train", "val"))
    (root / "val" / "hexagon").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "hexagon" / "x.png")
    with pytest.raises(UserError, match="'hexagon'"):
        load_data(str(root))


def test_csv_with_relative_paths_and_splits(tmp_path):
    make_folder(tmp_path / "imgs", per_class=4)
    rows = ["path,label,split"]
    for i in range(4):
        rows.append(f"imgs/circle/{i}.png,round,{'train' if i < 2 else 'test'}")
        rows.append(f"imgs/square/{i}.png,boxy,{'train' if i < 3 else 'val'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_data(str(tmp_path / "labels.csv"))
    assert data.classes == ["boxy", "round"]
    assert data.counts("train") == {"boxy": 3, "round": 2}
    assert data.counts("test") == {"boxy": 0, "round": 2}
    assert data.read(data.splits["train"][0][0]).size == (40, 40)


def test_csv_bad_split_value_names_the_row(tmp_path):
    (tmp_path / "l.csv").write_text("a.png,cat,training-set\n")
    with pytest.raises(UserError, match=r"l\.csv:1: split 'training-set' is not train, val or test"):
        load_data(str(tmp_path / "l.csv"))


def test_shots_keep_k_per_class_and_refuse_too_many(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10)
    data = load_data(str(root), shots=3)
    assert data.counts("train") == {"circle": 3, "square": 3}
    with pytest.raises(UserError, match="shots=9 but class 'circle' .* only 8 .* between 1 and 8"):
        load_data(str(root), shots=9)


def test_split_keeps_a_training_image_for_tiny_classes():
    samples = [("a0", "a"), ("b0", "b"), ("b1", "b"), ("b2", "b")]
    out = stratified_split(samples, 0.4, 0.4, seed=0)
    assert {lab for _, lab in out["train"]} == {"a", "b"}


def test_builtin_splits_are_fixed_and_documented():
    for name, test_n in (("faces", 80), ("textures", 108), ("digits", 359)):
        a, b = load_data(f"builtin:{name}", seed=0), load_data(f"builtin:{name}", seed=99)
        assert a.splits == b.splits, "builtin splits must not depend on the seed"
        assert len(a.splits["test"]) == test_n
    faces = load_data("builtin:faces")
    assert faces.counts("train") == {"face": 45, "non-face": 45}


def test_texture_train_and_test_patches_come_from_disjoint_rows():
    arrays, splits = builtin.load("textures")
    rows = {s: {int(ref.split("/")[-1].split("-")[0]) for ref, _ in v} for s, v in splits.items()}
    assert rows["train"] == {0, 1, 2, 3}
    assert rows["test"] == {5, 6, 7, 8}
    assert all(a.shape == (56, 56) for a in arrays.values())


def _write_batch(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    _write_batch(tmp_path / "batches.meta", {b"label_names": [b"cat", b"dog"]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_batch(
            tmp_path / name, {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 0, 1]}
        )
    data = load_data(f"cifar10:{tmp_path}", val_fraction=0.1)
    assert data.classes == ["cat", "dog"]
    assert len(data.splits["test"]) == 4
    assert len(data.splits["train"]) + len(data.splits["val"]) == 20
    assert data.read(data.splits["test"][0][0]).size == (32, 32)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar10_loader_refuses_pickles_that_are_not_plain_arrays(tmp_path, capsys):
    _write_batch(tmp_path / "batches.meta", {b"label_names": _Evil()})
    with pytest.raises(UserError, match="not a CIFAR-10 python batch"):
        load_data(f"cifar10:{tmp_path}")
    assert "pwned" not in capsys.readouterr().out


def test_split_file_is_reused(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10)
    first = load_data(str(root), seed=1)
    first.save_split(tmp_path / "split.json")
    again = load_data(str(root), seed=2, split_file=str(tmp_path / "split.json"))
    assert again.splits == first.splits


def test_bad_data_spec_messages(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_data(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No images found"):
        load_data(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="Did you mean 'builtin:faces'|Did you mean 'faces'"):
        load_data("builtin:face")


def test_seeded_draws_what_manual_seed_draws_and_gives_the_callers_streams_back():
    import random

    import torch

    from transferkit.data.sampling import seeded

    torch.manual_seed(7)
    want = (torch.rand(4), torch.randint(0, 100, (3,)))
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    callers = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    with seeded(7):
        got = (torch.rand(4), torch.randint(0, 100, (3,)))
    assert all(torch.equal(a, b) for a, b in zip(got, want))  # the CPU stream torch.manual_seed(7) gives
    after = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(after[0], callers[0])
    assert after[1:] == callers[1:]  # the block left the callers' alone
