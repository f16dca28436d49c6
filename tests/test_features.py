"""Feature cache: same head as training through the backbone, reuse, invalidation, augmented views."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app


def _head(run):
    state = torch.load(run.dir / "last.ckpt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k.startswith("head.")}


def _cached(cache_dir):
    return sorted(p.name for p in (cache_dir / "features").glob("*.npy"))


def test_cached_features_train_the_same_head_as_the_backbone_on_the_same_batches(shapes_dir, tiny, tmp_path):
    # bit-level agreement is an fp32 property: in bf16 the two paths round differently (see the next test)
    common = {
        **tiny,
        "data": str(shapes_dir),
        "strategy": "linear-probe",
        "epochs": 3,
        "batch_size": 4,
        "augment": "none",
        "cache_dir": str(tmp_path / "cache"),
        "precision": "fp32",
    }
    direct = transferkit.train(name="direct", feature_cache=False, **common)
    cached = transferkit.train(name="cached", feature_cache=True, **common)
    a, b = _head(direct), _head(cached)
    assert a.keys() == b.keys()
    assert a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert cached.metrics["test"]["accuracy"] == direct.metrics["test"]["accuracy"]
    assert len((cached.dir / "metrics.jsonl").read_text().splitlines()) == 3


# how far the cached feature vectors may be from a plain forward of the same images (BN not folded, one
# batch), in L2 relative to the mean vector norm, (mean over images, worst image): fp32 differs only by
# BN folding and summation order; bf16 keeps 8 significant bits, and lite0's depthwise layers compound
# that: measured at 32 px on these shapes (AVX2 EPYC, emulated bf16), each bf16 path is 8% off fp32 on
# average and up to 29% on one image, so two bf16 paths differ by about twice that
MAX_REL_L2 = {"fp32": (1e-4, 1e-4), "bf16": (0.25, 0.6)}


@pytest.mark.parametrize("precision,fold", [("fp32", True), ("bf16", True), ("fp32", False)])
def test_the_cache_holds_what_the_backbone_computes_at_the_run_precision(
    shapes_dir, tiny, tmp_path, precision, fold, monkeypatch
):
    """fold=False: BatchNorm that does not fold within its tolerance (TF32 on a GPU did that) leaves the
    backbone itself to extract, in eval mode all the same (it once ran in train mode: batch statistics)."""
    from transferkit.data.preprocessing import Preprocessing
    from transferkit.data.sources import ImageDataset, load_data
    from transferkit.data.transforms import eval_transform
    from transferkit.models import features
    from transferkit.models.runtime import Runtime

    if not fold:
        monkeypatch.setattr(features, "fold_batchnorm", lambda module, example: module)
    cache = tmp_path / "cache"
    run = transferkit.train(
        data=str(shapes_dir), strategy="linear-probe", name="p", cache_dir=str(cache), precision=precision, **tiny
    )
    model, meta = transferkit.deploy.bundle.load_bundle(run.dir)
    data = load_data(str(shapes_dir), split_file=str(run.dir / "split.json"))
    prep = Preprocessing.from_dict(meta["preprocessing"])
    (path,) = [
        p for p in (cache / "features").glob("*.npy") if '"split": "train"' in p.with_suffix(".json").read_text()
    ]
    assert f'"precision": "{precision}"' in path.with_suffix(".json").read_text()
    dataset = ImageDataset(data, "train", eval_transform(prep))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode(), Runtime(precision=precision).autocast("infer"):
        want = model.backbone.eval()(images).float()
    got = torch.from_numpy(np.load(path))
    distance = torch.cdist(got, want) / want.norm(dim=1).mean()  # cached x direct
    mean, worst = MAX_REL_L2[precision]
    assert distance.diagonal().mean().item() <= mean, distance.diagonal()
    assert distance.diagonal().max().item() <= worst, distance.diagonal()
    assert torch.equal(distance.argmin(1), torch.arange(len(got)))  # each row is its own image, in order


def test_cache_is_reused_and_a_changed_file_invalidates_it(shapes_dir, tiny, tmp_path):
    cache = tmp_path / "cache"
    common = {**tiny, "data": str(shapes_dir), "strategy": "linear-probe", "cache_dir": str(cache)}
    first = transferkit.train(name="a", **common)
    files = _cached(cache)
    assert len(files) == 2  # train and val
    before = {name: np.load(cache / "features" / name) for name in files}

    again = transferkit.train(name="b", **common)  # hit: nothing new, same features, same result
    assert _cached(cache) == files
    assert again.metrics["test"]["accuracy"] == first.metrics["test"]["accuracy"]

    train_file = sorted((shapes_dir / "circle").glob("*.png"))[0]
    Image.new("RGB", (40, 40), (255, 0, 0)).save(train_file)
    os.utime(train_file, ns=(1, 1))  # even an unchanged size is caught by mtime
    transferkit.train(name="c", **common)
    after = _cached(cache)
    assert len(after) == 3  # a new entry for the split holding the changed file; the other one reused
    new = (set(after) - set(files)).pop()
    changed = np.load(cache / "features" / new)
    old = next(v for v in before.values() if v.shape == changed.shape)
    assert not np.array_equal(changed, old)


def test_feature_views_cache_distinct_augmented_views(shapes_dir, tiny, tmp_path):
    cache = tmp_path / "cache"
    transferkit.train(data=str(shapes_dir), strategy="linear-probe", feature_views=3, cache_dir=str(cache), **tiny)
    arrays = [np.load(cache / "features" / name) for name in _cached(cache)]
    views = next(a for a in arrays if a.ndim == 3)
    assert views.shape[0] == 3
    assert views.shape[1] == 16
    assert not np.allclose(views[0], views[1])  # different augmentations


def test_image_cache_gives_the_pixels_of_direct_decoding(tmp_path):
    from transferkit.core.config import TrainConfig
    from transferkit.core.progress import Reporter
    from transferkit.data.imagecache import cache_size, cached_images
    from transferkit.data.preprocessing import Preprocessing
    from transferkit.data.sources import ImageDataset, load_data
    from transferkit.data.transforms import eval_transform

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(5):  # odd sizes and aspect ratios, JPEG and PNG
            pixels = rng.integers(0, 255, (rng.integers(50, 140), rng.integers(50, 140), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.{'jpg' if i % 2 else 'png'}")
        big = np.kron(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), np.ones((10, 10, 1), np.uint8))
        Image.fromarray(big).save(root / label / "photo.jpg")  # 400x300: decoded at 1/4 scale (draft)
    data = load_data(str(root), val_fraction=0.0, test_fraction=0.0)
    prep = Preprocessing(
        img_size=48, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.875, in_chans=3
    )
    config = TrainConfig(cache_dir=str(tmp_path / "cache"), workers=0)
    images = cached_images(data, "train", prep, config, Reporter(silent=True))
    assert images.shape == (12, cache_size(prep), cache_size(prep), 3)
    assert images.dtype == np.uint8
    direct = ImageDataset(data, "train", eval_transform(prep), min_side=prep.resize)  # as every reader does
    cached = ImageDataset(data, "train", eval_transform(prep, resized=True), images=images)
    for i in range(len(direct)):
        assert torch.equal(direct[i][0], cached[i][0])


def test_cache_hit_miss_and_rebuild_of_damaged_caches_train_identically(shapes_dir, tiny, tmp_path, capsys):
    """Building a cache must not move the run's random streams: a miss and a hit end the same. A feature cache
    cut short and an image cache with one flipped byte (same size) are named, built again, and change nothing."""
    cache = tmp_path / "cache"
    common = {
        **tiny,
        "data": str(shapes_dir),
        "strategy": "lp-ft",
        "epochs": 2,
        "head_dropout": 0.3,
        "cache_dir": str(cache),
    }
    miss = transferkit.train(name="miss", **common)
    (features,) = [
        p for p in (cache / "features").glob("*.npy") if '"split": "train"' in p.with_suffix(".json").read_text()
    ]
    images = max((cache / "images").glob("*.npy"), key=lambda p: p.stat().st_size)  # the train split's
    with open(features, "r+b") as fh:
        fh.truncate(features.stat().st_size - 100)
    with open(images, "r+b") as fh:
        fh.seek(images.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    rebuilt = transferkit.train(name="rebuilt", **common)
    said = capsys.readouterr().err
    assert f"cache file '{features}' is truncated or damaged" in said, said
    assert f"cache file '{images}' is corrupt: its checksum differs" in said, said
    hit = transferkit.train(name="hit", **common)
    assert "warning: cache file" not in capsys.readouterr().err
    a = torch.load(miss.dir / "last.ckpt", weights_only=True)["model"]
    for run in (rebuilt, hit):
        b = torch.load(run.dir / "last.ckpt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    listed = CliRunner().invoke(app, ["cache", "--cache-dir", str(cache)])
    assert f"{cache / 'features'}: 4 file(s)" in listed.output, listed.output  # train and val: .npy and .json
    cleared = CliRunner().invoke(app, ["cache", "--cache-dir", str(cache), "--clear"])
    assert cleared.exit_code == 0
    assert "freed" in cleared.output
    assert not (cache / "features").exists()
    assert not (cache / "images").exists()


@pytest.mark.parametrize("fails", ["record", "rename"])
def test_a_cache_filled_but_not_sealed_is_kept_in_memory(tmp_path, monkeypatch, fails):
    """The disk fills after the rows are written, while the record or the rename is: the run keeps the
    filled rows in memory, says so, and leaves no temp file and no cache file behind."""
    import errno

    from transferkit.core.distributed import Dist
    from transferkit.data import cachefiles

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cachefiles, "atomic_write" if fails == "record" else "durable_replace", full)
    said = []
    path = tmp_path / "features" / "key.npy"

    def fill(array, rows):
        array[rows] = np.arange(len(rows) * 3, dtype=np.float32).reshape(-1, 3)

    kept = cachefiles.build_cache(Dist(), path, (4, 3), np.float32, fill, {"key": 1}, said.append)
    assert np.array_equal(kept, np.arange(12, dtype=np.float32).reshape(4, 3))
    assert len(said) == 1
    assert "cannot write the cache file" in said[0]
    assert "the disk is full" in said[0]
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix == ".npy" or p.name.endswith(".tmp")) == []
