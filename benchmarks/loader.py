"""How fast the training loader feeds batches, side by side in one run: float batches normalised in the
workers (the first way), uint8 batches normalised by `Runtime.batch` (`--crop-on workers`), and uint8 squares
with crop rows that `Runtime.batch` crops (`--crop-on device`, the default on CUDA: the workers only draw the crops).

`python benchmarks/loader.py [--workers N] [--out DIR]` writes DIR/loader.json and loader.md (default DIR:
benchmarks/results/). The data are benchmarks/gpu.py's JPEGs (10 classes, ~500x375 px); the loader is the one
`transferkit train` makes for efficientnet_lite0 at 224 px (random resized crop + flip) over the decoded-image
cache; the images reach the GPU as the model's input with --device cuda; on a CPU the batches are only drawn,
which measures what the workers supply (where the GPU normalises at no cost to them). On the lent H200
(benchmarks/results/gpu-h200-2026-11-26.md) the old loader left the GPU waiting for data half of every step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from harness import cpu_name, machine, parser, write_results


def feed(loader, rt, batches: int) -> float:
    """Images per second out of the loader (and, on CUDA, into the model's input on the GPU), after one
    warm-up batch (the workers start). On a CPU the batches are only drawn: what the workers supply."""
    move = rt.batch if rt.device.type == "cuda" else (lambda images: images)
    items = iter(loader)
    move(next(items)[0])
    tick, seen = time.perf_counter(), 0
    for _, (images, labels, _) in zip(range(batches), items):
        move(images)
        seen += len(labels)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - tick)


def main() -> None:
    from gpu import make_jpegs

    from transferkit.core.config import TrainConfig
    from transferkit.core.machine import default_workers, pick_device
    from transferkit.core.progress import Reporter
    from transferkit.data.imagecache import cached_images
    from transferkit.data.loaders import make_loader
    from transferkit.data.sources import load_data
    from transferkit.data.transforms import DeviceCrop, train_transform
    from transferkit.models.classifier import build_classifier
    from transferkit.models.runtime import Runtime

    args_parser = parser(__doc__)
    args_parser.add_argument("--workers", type=int, default=None)
    args_parser.add_argument("--device", default="cpu")
    args_parser.add_argument("--batch", type=int, default=64)
    args_parser.add_argument("--batches", type=int, default=24)
    args_parser.add_argument("--work", type=Path, default=Path("/tmp/transferkit-loader-bench"))
    args = args_parser.parse_args()
    device = pick_device(args.device)
    workers = args.workers if args.workers is not None else default_workers(False, device.type == "cuda")
    folder = args.work / "data"
    if not folder.exists():
        make_jpegs(folder, {"train": args.batch * (args.batches + 1) // 10 + 1, "val": 2, "test": 2})
    config = TrainConfig(data=str(folder), batch_size=args.batch, workers=workers, cache_dir=str(args.work / "cache"))
    data = load_data(config.data)
    _, _, prep = build_classifier("efficientnet_lite0", "none", len(data.classes), img_size=224)
    decoded = cached_images(data, "train", prep, config, Reporter(silent=True))
    ways = {
        "float, normalised in the workers": train_transform(prep, "basic"),
        "uint8, normalised by Runtime": train_transform(prep, "basic", normalize=False),
        "uint8 squares, cropped and normalised by Runtime": DeviceCrop(prep),
    }
    rows = []
    for name in [*ways, *ways]:  # alternated: the second round shows the spread
        loader = make_loader(data, "train", ways[name], config, shuffle=True, images=decoded, min_side=prep.resize)
        rt = Runtime(device, channels_last=True, normalize=None if name.startswith("float") else prep.mean_std)
        rows.append({"batches": name, "images_per_s": feed(loader, rt, args.batches)})
        print(f"[loader] {rows[-1]['batches']}: {rows[-1]['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
        del loader
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = cpu_name()
    result = {
        "machine": where,
        "host": machine(),
        "device": str(device),
        "workers": workers,
        "batch": args.batch,
        "rows": rows,
    }
    lines = [
        f"# Training loader throughput: {where}, {workers} workers, batch {args.batch}, lite0 224 px",
        "",
        "| batches | img/s |",
        "|---|---|",
    ] + [f"| {r['batches']} | {r['images_per_s']:.0f} |" for r in rows]
    write_results("loader", result, "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
