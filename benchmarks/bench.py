"""transferkit against the seed tutorials' plain loop: same data, model, resolution and epochs.

`make bench` (or `python benchmarks/bench.py [--cases B1,B3] [--quick]`) writes
benchmarks/bench.json and benchmarks/bench.md. Every case runs both sides in this one
process, one after the other, and reports the ratio. Never run two benchmarks at once on a
small machine: they would share its cores and both figures would be wrong.

The reference ("the plain loop") is what the tutorials write: torchvision ImageFolder with
PIL decoding every epoch, the frozen backbone recomputed for every batch, DataLoader and
torch defaults. It uses the same pretrained weights as transferkit (built the same way).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
TEXTURES = ("brick", "grass", "gravel")


def texture_folder(root: Path, per_class: dict[str, int], size: int, photo: int | None = None) -> Path:
    """JPEG folder of skimage texture crops: train/val from the top half of each photo, test from the
    bottom half (disjoint pixels). `photo` upscales each crop to a photo-sized JPEG (decode cost)."""
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    for name in TEXTURES:
        full = np.asarray(getattr(skdata, name)())
        full = np.stack([full] * 3, -1) if full.ndim == 2 else full[..., :3]
        for split, n in per_class.items():
            rows = (0, 256 - size) if split != "test" else (256, 512 - size)
            out = root / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                y, x = rng.integers(rows[0], rows[1] + 1), rng.integers(0, 512 - size + 1)
                img = Image.fromarray(full[y : y + size, x : x + size])
                if photo:
                    img = img.resize((photo, photo * 3 // 4), Image.BICUBIC)
                img.save(out / f"{i}.jpg", quality=90)
    return root


def reference_linear_probe(folder: Path, img_size: int, epochs: int, batch_size: int = 32) -> dict:
    """The tutorial loop: ImageFolder + augmentation, whole model forward every batch, head trains."""
    from torchvision import datasets, transforms as T

    from transferkit.model import build_classifier

    tick = time.perf_counter()
    model, _, prep = build_classifier("efficientnet_lite0", "auto", len(TEXTURES), img_size=img_size)
    normalize = T.Normalize(prep.mean, prep.std)
    train_tf = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test_tf = T.Compose([T.Resize(int(img_size / prep.crop_pct)), T.CenterCrop(img_size), T.ToTensor(), normalize])
    train = torch.utils.data.DataLoader(datasets.ImageFolder(folder / "train", train_tf), batch_size, shuffle=True)
    test = torch.utils.data.DataLoader(datasets.ImageFolder(folder / "test", test_tf), batch_size)
    for p in model.backbone.parameters():
        p.requires_grad = False
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for images, labels in train:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {"seconds": time.perf_counter() - tick, "test_accuracy": _accuracy(model, test)}


@torch.no_grad()
def _accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / total


def b1(work: Path, quick: bool) -> dict:
    """Linear-probe time-to-result on >= 2,000 JPEGs, 10 epochs (cold feature cache)."""
    import transferkit

    n = {"train": 700, "val": 50, "test": 100} if not quick else {"train": 60, "val": 10, "test": 20}
    folder = texture_folder(work / "b1", n, size=128)
    img_size, epochs = 96, 10
    tick = time.perf_counter()
    run = transferkit.train(data=str(folder), strategy="linear-probe", epochs=epochs, img_size=img_size,
                            runs_dir=str(work / "runs"), name="b1", quiet=True, cache_dir=str(work / "cache-b1"))
    ours = {"seconds": time.perf_counter() - tick, "test_accuracy": run.metrics["test"]["accuracy"]}
    ref = reference_linear_probe(folder, img_size, epochs)
    return {"case": "B1", "what": f"linear-probe, {3 * sum(n.values())} JPEGs (128 px crops), {img_size} px, "
                                  f"{epochs} epochs, time to test accuracy",
            "transferkit": ours, "reference": ref, "ratio": ref["seconds"] / ours["seconds"], "target": ">= 10x",
            "unit": "s"}


def b3(work: Path, quick: bool) -> dict:
    """Epoch time of a fine-tune over photo-sized JPEGs with and without the decoded-image cache."""
    import transferkit

    n = {"train": 240, "val": 24, "test": 24} if not quick else {"train": 32, "val": 8, "test": 8}
    folder = texture_folder(work / "b3", n, size=128, photo=1600)
    epochs, build = {}, 0.0
    for cache in (False, True):  # the default worker count for both
        run = transferkit.train(data=str(folder), strategy="finetune", epochs=3, img_size=64, image_cache=cache,
                                runs_dir=str(work / "runs"), name=f"b3-{cache}", quiet=True,
                                cache_dir=str(work / "cache-b3"))
        rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
        epochs[cache] = [r["epoch_s"] for r in rows]
        build = run.metrics["image_cache_s"]
    later_plain, later_cached = np.mean(epochs[False][1:]), np.mean(epochs[True][1:])
    return {"case": "B3", "what": f"finetune epochs over {3 * n['train']} 1600x1200 JPEGs at 64 px; reference = "
                                  "the same run decoding the files every epoch",
            "transferkit": {"epoch_s": epochs[True], "cache_build_s": build}, "reference": {"epoch_s": epochs[False]},
            "ratio": later_plain / later_cached, "target": ">= 3x from epoch 2", "unit": "s/epoch"}


CASES = {"B1": b1, "B3": b3}


def machine() -> str:
    import os

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def markdown(results: list[dict], where: str) -> str:
    lines = [f"Machine: {where}", "", "| case | what | transferkit | reference | ratio | target |",
             "|---|---|---|---|---|---|"]
    for r in results:
        def show(side):
            if "seconds" in side:
                return f"{side['seconds']:.1f} s, acc {side['test_accuracy']:.3f}"
            build = f" (+ {side['cache_build_s']:.1f} s to build the cache)" if "cache_build_s" in side else ""
            return ", ".join(f"{v:.1f}" for v in side["epoch_s"]) + " s/epoch" + build

        lines.append(f"| {r['case']} | {r['what']} | {show(r['transferkit'])} | {show(r['reference'])} | "
                     f"{r['ratio']:.1f}x | {r['target']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, e.g. B1,B3")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, not the speed")
    parser.add_argument("--out", default=str(HERE), help="folder for bench.json and bench.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transferkit-bench-"))
    # imports once, before any timing: both sides of a case run in this process after them
    import timm  # noqa: F401
    import torchvision.datasets  # noqa: F401

    import transferkit.loop  # noqa: F401
    results = []
    try:
        for name in args.cases.split(","):
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            results.append(CASES[name.strip()](work, args.quick))
            print(f"[bench] {name}: {results[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    where = machine()
    out = Path(args.out)
    (out / "bench.json").write_text(json.dumps({"machine": where, "quick": args.quick, "results": results}, indent=1))
    (out / "bench.md").write_text(markdown(results, where))
    print(markdown(results, where))


if __name__ == "__main__":
    main()
