"""transferkit against the seed tutorials' plain loop: same data, model, resolution and epochs.

`make bench` (or `python benchmarks/bench.py [--cases B1,B3] [--quick] [--out DIR]`) writes
bench.json and bench.md into DIR (default benchmarks/results/). Every case runs both sides in this one
process, one after the other, and reports the ratio. Never run two benchmarks at once on a
small machine: they would share its cores and both figures would be wrong.

The reference ("the plain loop") is what the tutorials write: torchvision ImageFolder with
PIL decoding every epoch, the frozen backbone recomputed for every batch, DataLoader and
torch defaults. It uses the same pretrained weights as transferkit (built the same way).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import machine, machine_line, read_results, write_results
from harness import parser as harness_parser
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
    from torchvision import datasets
    from torchvision import transforms as T

    from transferkit.models.classifier import build_classifier

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


B1_IMG_SIZE, B1_EPOCHS = 96, 10


def b1_folder(work: Path, quick: bool) -> tuple[Path, dict[str, int]]:
    """B1's JPEG folder (the same images every time: the crops are seeded) and its images per class and split."""
    n = {"train": 700, "val": 50, "test": 100} if not quick else {"train": 60, "val": 10, "test": 20}
    return texture_folder(work / "b1", n, size=128), n


def b1_command(folder: Path, work: Path, name: str = "b1") -> list[str]:
    """transferkit's side of B1 as a user types it; its run and cache go under `work` (cold caches: a new
    `name` per run)."""
    return [
        sys.executable,
        "-m",
        "transferkit",
        "train",
        str(folder),
        "--strategy",
        "linear-probe",
        "--epochs",
        str(B1_EPOCHS),
        "--img-size",
        str(B1_IMG_SIZE),
        "--runs-dir",
        str(work / "runs"),
        "--name",
        name,
        "--quiet",
        "--cache-dir",
        str(work / f"cache-{name}"),
    ]


def b1(work: Path, quick: bool) -> dict:
    """Linear-probe time to test accuracy on >= 2,000 JPEGs, 10 epochs, cold caches. Each side is a whole
    process, as a user runs it: interpreter start, imports, data, training, test (and our report) counted."""
    folder, n = b1_folder(work, quick)
    img_size, epochs = B1_IMG_SIZE, B1_EPOCHS
    ours_cmd = b1_command(folder, work)
    ref_cmd = [sys.executable, str(Path(__file__).resolve()), "--reference-b1", str(folder), str(img_size), str(epochs)]
    sides = {}
    for side, command in (("transferkit", ours_cmd), ("reference", ref_cmd)):
        tick = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - tick
        if out.returncode:
            raise RuntimeError(f"{side} failed: {out.stderr[-2000:]}")
        sides[side] = {
            "seconds": seconds,
            "test_accuracy": json.loads(out.stdout.strip().splitlines()[-1])["test_accuracy"],
        }
    ours, ref = sides["transferkit"], sides["reference"]
    return {
        "case": "B1",
        "what": f"linear-probe, {3 * sum(n.values())} JPEGs (128 px crops), {img_size} px, "
        f"{epochs} epochs, time to test accuracy, whole processes (imports counted)",
        "transferkit": ours,
        "reference": ref,
        "ratio": ref["seconds"] / ours["seconds"],
        "target": ">= 10x",
        "shown": [f"{side['seconds']:.1f} s, acc {side['test_accuracy']:.3f}" for side in (ours, ref)],
    }


def b3(work: Path, quick: bool) -> dict:
    """Epoch time of a fine-tune over photo-sized JPEGs with and without the decoded-image cache."""
    import transferkit

    n = {"train": 240, "val": 24, "test": 24} if not quick else {"train": 32, "val": 8, "test": 8}
    folder = texture_folder(work / "b3", n, size=128, photo=1600)
    epochs, build = {}, 0.0
    for cache in (False, True):  # the default worker count for both
        run = transferkit.train(
            data=str(folder),
            strategy="finetune",
            epochs=3,
            img_size=64,
            image_cache=cache,
            runs_dir=str(work / "runs"),
            name=f"b3-{cache}",
            quiet=True,
            cache_dir=str(work / "cache-b3"),
        )
        rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
        epochs[cache] = [r["epoch_s"] for r in rows]
        build = run.metrics["image_cache_s"]
    later_plain, later_cached = np.mean(epochs[False][1:]), np.mean(epochs[True][1:])
    return {
        "case": "B3",
        "what": f"finetune epochs over {3 * n['train']} 1600x1200 JPEGs at 64 px; reference = "
        "the same run decoding the files every epoch",
        "transferkit": {"epoch_s": epochs[True], "cache_build_s": build},
        "reference": {"epoch_s": epochs[False]},
        "ratio": later_plain / later_cached,
        "target": ">= 3x from epoch 2",
        "shown": [
            ", ".join(f"{v:.1f}" for v in epochs[True]) + f" s/epoch (+ {build:.1f} s to build the cache)",
            ", ".join(f"{v:.1f}" for v in epochs[False]) + " s/epoch",
        ],
    }


def gemm_ceiling(n: int = 2048, repeats: int = 8) -> float:
    """The machine's fp32 matrix-multiply rate in GFLOP/s: best of `repeats` n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tick)
    return 2 * n**3 / best / 1e9


def train_flops_per_image(img_size: int) -> float:
    """FLOPs of one training image: 3 x the forward pass (convolutions and matmuls as torch counts them;
    backward ~ 2 x forward). torch's counter overcounts the backward of depthwise convolutions (it ignores
    their groups: 5.9 GFLOP counted against 0.14 forward at 96 px), so the backward is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from transferkit.models.classifier import build_classifier

    model, _, _ = build_classifier("efficientnet_lite0", "none", len(TEXTURES), img_size=img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(4, 3, img_size, img_size))
    return 3 * counter.get_total_flops() / 4


def reference_finetune(folder: Path, img_size: int, epochs: int, batch_size: int = 32) -> list[float]:
    """The tutorial fine-tune: ImageFolder + augmentation decoded every epoch, every weight trains; img/s per epoch."""
    from torchvision import datasets
    from torchvision import transforms as T

    from transferkit.models.classifier import build_classifier

    model, _, prep = build_classifier("efficientnet_lite0", "auto", len(TEXTURES), img_size=img_size)
    tf = T.Compose(
        [T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(prep.mean, prep.std)]
    )
    train = torch.utils.data.DataLoader(datasets.ImageFolder(folder, tf), batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rates = []
    for _ in range(epochs):
        model.train()
        tick, seen = time.perf_counter(), 0
        for images, labels in train:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - tick))
    return rates


B2_IMG_SIZE, B2_EPOCHS, B2_LR = 96, 2, 1e-4


def b2_folder(work: Path, quick: bool) -> tuple[Path, dict[str, int]]:
    """B2's JPEG folder (seeded crops, the same every time) and its images per class and split."""
    n = {"train": 200, "val": 20, "test": 20} if not quick else {"train": 20, "val": 4, "test": 4}
    return texture_folder(work / "b2", n, size=128), n


def b2_command(folder: Path, work: Path, name: str = "b2") -> list[str]:
    """B2's transferkit run as a command (B2 itself calls `transferkit.train` with these settings): the
    images_per_s of its last epoch in runs/NAME/metrics.jsonl is B2's figure."""
    return [
        sys.executable,
        "-m",
        "transferkit",
        "train",
        str(folder),
        "--strategy",
        "full",
        "--epochs",
        str(B2_EPOCHS),
        "--img-size",
        str(B2_IMG_SIZE),
        "--lr",
        str(B2_LR),
        "--runs-dir",
        str(work / "runs"),
        "--name",
        name,
        "--quiet",
        "--cache-dir",
        str(work / f"cache-{name}"),
    ]


def b2(work: Path, quick: bool) -> dict:
    """Full fine-tune training throughput, and the FLOP rate it reaches against the machine's GEMM rate."""
    import transferkit

    folder, n = b2_folder(work, quick)
    img_size, epochs = B2_IMG_SIZE, B2_EPOCHS
    run = transferkit.train(
        data=str(folder),
        strategy="full",
        epochs=epochs,
        img_size=img_size,
        lr=B2_LR,
        runs_dir=str(work / "runs"),
        name="b2",
        quiet=True,
        cache_dir=str(work / "cache-b2"),
    )
    rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
    ours = rows[-1]["images_per_s"]  # the last epoch: caches built, steady state
    ref = reference_finetune(folder / "train", img_size, epochs)[-1]
    flops, ceiling = train_flops_per_image(img_size), gemm_ceiling()
    achieved = ours * flops / 1e9
    return {
        "case": "B2",
        "what": f"full fine-tune throughput, {3 * n['train']} JPEGs (128 px crops) at {img_size} px, "
        f"batch 32, last of {epochs} epochs; GFLOP/s against a 2048x2048 fp32 GEMM",
        "transferkit": {
            "images_per_s": ours,
            "gflops": achieved,
            "gflop_per_image": flops / 1e9,
            "gemm_ceiling_gflops": ceiling,
            "fraction_of_ceiling": achieved / ceiling,
        },
        "reference": {"images_per_s": ref, "gflops": ref * flops / 1e9},
        "ratio": ours / ref,
        "target": ">= 1.0x, and >= 50% of the GEMM ceiling",
        "shown": [
            f"{ours:.1f} img/s = {achieved:.1f} GFLOP/s, {100 * achieved / ceiling:.0f}% of the "
            f"{ceiling:.0f} GFLOP/s GEMM ceiling",
            f"{ref:.1f} img/s = {ref * flops / 1e9:.1f} GFLOP/s",
        ],
    }


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """Run a command; its peak resident memory in MB (its own high-water mark plus its children's resident
    memory, polled every 50 ms) and its wall time. Not rusage: a child forked from this large process
    inherits its high-water mark, so ru_maxrss would report this process, not the command."""
    import subprocess

    tick, peak = time.perf_counter(), 0
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True)
        while proc.poll() is None:
            peak = max(peak, _status_kb(proc.pid, "VmHWM") + sum(_status_kb(c, "VmRSS") for c in _children(proc.pid)))
            time.sleep(0.05)
        seconds = time.perf_counter() - tick
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{command[:4]} failed: {err.read()[-2000:]}")
    return peak / 1024, seconds


REFERENCE_B4 = """
import sys, time, torch
sys.path.insert(0, {here!r})
from bench import reference_finetune
reference_finetune(__import__("pathlib").Path({folder!r}), {img_size}, 1)
"""


def b4(work: Path, quick: bool) -> dict:
    """Peak RSS of a fine-tune epoch over a 20,000-image folder (each side in its own process)."""
    per_class = 6666 if not quick else 100  # 19,998: the reference loop fails on a last batch of 1 (BatchNorm)
    folder = texture_folder(work / "b4", {"train": per_class}, size=48) / "train"
    img_size = 32
    ours, ours_s = peak_rss_mb(
        [
            sys.executable,
            "-m",
            "transferkit",
            "train",
            str(folder),
            "--strategy",
            "finetune",
            "--epochs",
            "1",
            "--img-size",
            str(img_size),
            "--lr",
            "1e-4",
            "--quiet",
            "--runs-dir",
            str(work / "runs"),
            "--name",
            "b4",
            "--cache-dir",
            str(work / "cache-b4"),
        ]
    )
    ref, ref_s = peak_rss_mb(
        [sys.executable, "-c", REFERENCE_B4.format(here=str(HERE), folder=str(folder), img_size=img_size)]
    )
    return {
        "case": "B4",
        "what": f"peak RSS, finetune 1 epoch over {3 * per_class} JPEGs at {img_size} px, "
        "whole process (scan, caches, train, test)",
        "transferkit": {"peak_rss_mb": ours, "seconds": ours_s},
        "reference": {"peak_rss_mb": ref, "seconds": ref_s},
        "ratio": ref / ours,
        "target": "< 2 GB",
        "shown": [f"{ours:.0f} MB ({ours_s:.0f} s)", f"{ref:.0f} MB ({ref_s:.0f} s, train epoch only)"],
    }


def b5(work: Path, quick: bool) -> dict:
    """Batch inference over photo-sized JPEGs: `predict` against a plain timm eval loop, same weights."""
    from PIL import Image as PILImage
    from timm.data import create_transform

    import transferkit
    from transferkit.deploy.bundle import load_bundle, save_bundle
    from transferkit.models.classifier import build_classifier

    n = 600 if not quick else 24
    folder = texture_folder(work / "b5", {"test": n // 3}, size=128, photo=640)
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    model, record, prep = build_classifier("efficientnet_lite0", "auto", len(TEXTURES), img_size=224)
    save_bundle(
        work / "b5-bundle", model, {"architecture": record, "classes": list(TEXTURES), "preprocessing": prep.to_dict()}
    )
    clf = transferkit.load(work / "b5-bundle")
    clf.predict_proba(files[:4])  # first call folds BN; not part of the rate
    tick = time.perf_counter()
    ours = clf.predict_proba(files, batch_size=64)
    ours_rate = len(files) / (time.perf_counter() - tick)

    plain, _ = load_bundle(work / "b5-bundle")
    plain.eval()
    tf = create_transform(
        input_size=(3, 224, 224), interpolation=prep.interpolation, mean=prep.mean, std=prep.std, crop_pct=prep.crop_pct
    )
    with torch.no_grad():
        plain(torch.stack([tf(PILImage.open(f).convert("RGB")) for f in files[:4]]))
        tick, theirs = time.perf_counter(), []
        for start in range(0, len(files), 64):
            batch = torch.stack([tf(PILImage.open(f).convert("RGB")) for f in files[start : start + 64]])
            theirs.append(plain(batch).softmax(-1))
    ref_rate = len(files) / (time.perf_counter() - tick)
    agree = float((torch.cat(theirs).argmax(1).numpy() == ours.argmax(1)).mean())
    return {
        "case": "B5",
        "what": f"batch inference, {len(files)} 640x480 JPEGs at 224 px, batch 64: "
        "`predict` against a plain timm eval loop",
        "transferkit": {"images_per_s": ours_rate, "top1_agreement": agree},
        "reference": {"images_per_s": ref_rate},
        "ratio": ours_rate / ref_rate,
        "target": ">= 1.0x",
        "shown": [f"{ours_rate:.1f} img/s (top-1 agrees on {100 * agree:.0f}%)", f"{ref_rate:.1f} img/s"],
    }


def _best_of(command: list[str], repeats: int) -> float:
    """Fastest wall time of `command` over `repeats` runs (start-up cost: the minimum is the cost, the rest noise)."""
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        best = min(best, time.perf_counter() - tick)
    return best


def b6(work: Path, quick: bool) -> dict:
    """Fixed costs: `transferkit --help` against `python -c "import torch"`, best of 5 each."""
    repeats = 5 if not quick else 1
    ours = _best_of([sys.executable, "-m", "transferkit", "--help"], repeats)
    ref = _best_of([sys.executable, "-c", "import torch"], repeats)
    return {
        "case": "B6",
        "what": f'`transferkit --help` against `python -c "import torch"`, whole processes, best of {repeats}',
        "transferkit": {"seconds": ours},
        "reference": {"seconds": ref},
        "ratio": ref / ours,
        "target": "< 0.5 s",
        "shown": [f"{ours:.2f} s", f"{ref:.2f} s"],
    }


CASES = {"B1": b1, "B2": b2, "B3": b3, "B4": b4, "B5": b5, "B6": b6}


def markdown(results: list[dict], where: str) -> str:
    lines = [
        f"Machine: {where}",
        "",
        "| case | what | transferkit | reference | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['what']} | {r['shown'][0]} | {r['shown'][1]} | {r['ratio']:.2f}x | {r['target']} |"
        )
    return "\n".join(lines) + "\n"


def merged(results: list[dict], where: str, out: Path) -> list[dict]:
    """A subset of cases replaces just those rows of OUT/bench.json, where that file is a full run on this
    machine; otherwise the cases run here are the whole result."""
    earlier = read_results("bench", out)
    if earlier is None or earlier["quick"] or earlier.get("machine_line") != where:
        return results
    ran = {r["case"] for r in results}
    return sorted([r for r in earlier["results"] if r["case"] not in ran] + results, key=lambda r: r["case"])


def main() -> None:
    parser = harness_parser(__doc__, quick=True)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, e.g. B1,B3")
    parser.add_argument(
        "--reference-b1",
        nargs=3,
        metavar=("FOLDER", "IMG_SIZE", "EPOCHS"),
        help="run B1's reference loop alone and print its result (B1 runs this as a process)",
    )
    args = parser.parse_args()
    if args.reference_b1:
        folder, img_size, epochs = args.reference_b1
        print(json.dumps(reference_linear_probe(Path(folder), int(img_size), int(epochs))))
        return
    work = Path(tempfile.mkdtemp(prefix="transferkit-bench-"))
    # imports once, before any timing: both sides of a case run in this process after them
    import timm  # noqa: F401
    import torchvision.datasets  # noqa: F401

    import transferkit.training.recipe  # noqa: F401

    results = []
    try:
        for name in args.cases.split(","):
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            results.append(CASES[name.strip()](work, args.quick))
            print(f"[bench] {name}: {results[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    where = machine()
    line = machine_line(where)
    if not args.quick:
        results = merged(results, line, args.out)
    result = {"machine": where, "machine_line": line, "quick": args.quick, "results": results}
    write_results("bench", result, markdown(results, line), args.out)
    print(markdown(results, line))


if __name__ == "__main__":
    main()
