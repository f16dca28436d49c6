"""Fine-tuning speed and memory on a CUDA GPU, against timm's train.py on the same GPU in the same run.

`python benchmarks/gpu.py --timm-train PATH/TO/timm/train.py --out DIR` writes DIR/gpu.json and gpu.md
(default DIR: benchmarks/results/):

1. ladder: training img/s of the model alone (batches already on the GPU; transferkit's classifier,
   Runtime and AdamW step) for efficientnet_lite0 and resnet50 at 224 px, weights none: fp32 (TF32
   matrix units), bf16 autocast, bf16 + channels_last, + torch.compile. This is the ceiling a loader
   can at best let a run reach.
2. memory: peak GPU memory of one training step per batch size (bf16 + channels_last).
3. pipeline: whole runs on a folder of JPEGs (made here: 10 classes, ~500x375 px, smooth content),
   `transferkit train` against `timm train.py` with the same model, batch, precision, memory format
   and loader workers: img/s of the second epoch (the first warms cuDNN and, for transferkit, fills
   the decoded-image cache), the share of step time spent waiting for the loader, and the whole
   2-epoch command's seconds (start-up, first-epoch warm-up and evaluation included).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from harness import cpu_name, parser, write_results

MODELS = ("efficientnet_lite0", "resnet50")
LADDER = (("fp32", False, False), ("bf16", False, False), ("bf16", True, False), ("bf16", True, True))


def _say(msg: str) -> None:
    print(f"[gpu-bench] {msg}", file=sys.stderr, flush=True)


def _image(args) -> None:
    """One smooth colour JPEG (upsampled noise + gradient: compresses like a photo, not like noise)."""
    path, seed, size = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(root: Path, per_class: dict[str, int], classes: int = 10) -> Path:
    jobs = []
    for s, (split, n) in enumerate(per_class.items()):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{i}.jpg", (s * classes + c) * 100_000 + i, (500, 375)) for i in range(n)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_image, jobs, chunksize=64)
    return root


def _timed_steps(step, sync, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - tick


def ladder(device: torch.device, size: int, batch: int, steps: int, configs=LADDER) -> list[dict]:
    from transferkit.core.machine import configure_cuda
    from transferkit.models.classifier import build_classifier
    from transferkit.models.runtime import Runtime

    configure_cuda(deterministic=False)
    rows = []
    for name in MODELS:
        for precision, channels_last, compiled in configs:
            model, _, _ = build_classifier(name, "none", 10, img_size=size)
            rt = Runtime(device, precision, channels_last, compile=compiled)
            rt.prepare(model)
            net = torch.compile(model) if compiled else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = rt.batch(torch.randn(batch, 3, size, size))
            y = torch.randint(0, 10, (batch,), device=device)
            loss_fn = torch.nn.CrossEntropyLoss()

            def step():
                opt.zero_grad(set_to_none=True)
                with rt.autocast("train"):
                    loss = loss_fn(net(x).float(), y)
                loss.backward()
                opt.step()

            tick = time.perf_counter()
            step()  # compiles, picks cuDNN kernels
            _sync(device)
            first = time.perf_counter() - tick
            seconds = _timed_steps(step, lambda: _sync(device), 3, steps)
            rows.append(
                {
                    "model": name,
                    "precision": precision,
                    "channels_last": channels_last,
                    "compile": compiled,
                    "batch": batch,
                    "img_size": size,
                    "images_per_s": batch * steps / seconds,
                    "first_step_s": first,
                }
            )
            _say(
                f"ladder {name} {precision} cl={channels_last} compile={compiled}: "
                f"{rows[-1]['images_per_s']:.0f} img/s (first step {first:.1f} s)"
            )
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def memory(device: torch.device, size: int, batches: list[int]) -> list[dict]:
    from transferkit.models.classifier import build_classifier
    from transferkit.models.runtime import Runtime

    rows = []
    for name in MODELS:
        for batch in batches:
            model, _, _ = build_classifier(name, "none", 10, img_size=size)
            rt = Runtime(device, "bf16", True)
            rt.prepare(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                for _ in range(2):  # the second step holds AdamW's state too
                    opt.zero_grad(set_to_none=True)
                    with rt.autocast("train"):
                        loss = torch.nn.functional.cross_entropy(
                            model(rt.batch(torch.randn(batch, 3, size, size))).float(),
                            torch.randint(0, 10, (batch,), device=device),
                        )
                    loss.backward()
                    opt.step()
                peak = torch.cuda.max_memory_allocated(device) / 2**30
            except torch.OutOfMemoryError:
                peak = None
            rows.append({"model": name, "batch": batch, "img_size": size, "peak_gb": peak})
            _say(f"memory {name} batch {batch}: {peak if peak is None else f'{peak:.2f}'} GiB")
            del model, opt
            torch.cuda.empty_cache()
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(
    data: Path,
    work: Path,
    model: str,
    batch: int,
    workers: int,
    image_cache: bool,
    compiled: bool,
    device: str = "cuda",
    crop_on: str = "workers",
    profile: int = 0,
    out: Path | None = None,
) -> dict:
    name = f"{model}-{'cache' if image_cache else 'files'}-{crop_on}{'-compiled' if compiled else ''}"
    cmd = [
        sys.executable,
        "-m",
        "transferkit",
        "train",
        str(data),
        "--model",
        model,
        "--weights",
        "none",
        "--strategy",
        "full",
        "--epochs",
        "2",
        "--batch-size",
        str(batch),
        "--precision",
        "bf16",
        "--channels-last",
        "--workers",
        str(workers),
        "--device",
        device,
        "--quiet",
        "--no-report",
        "--warmup-epochs",
        "0",
        "--runs-dir",
        str(work / "runs"),
        "--name",
        name,
        "--overwrite",
        "--cache-dir",
        str(work / "cache"),
        "--image-cache" if image_cache else "--no-image-cache",
        "--compile" if compiled else "--no-compile",
        "--crop-on",
        crop_on,
    ] + (["--profile-steps", str(profile)] if profile else [])
    tick = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"transferkit train failed: {proc.stderr[-3000:]}")
    rows = [json.loads(r) for r in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((work / "runs" / name / "metrics.json").read_text())
    if profile and out is not None:  # profile.txt beside gpu.md (the trace stays in the run directory: large)
        (out / f"profile-{name}.txt").write_text((work / "runs" / name / "profile.txt").read_text())
    return {
        "tool": "transferkit",
        "model": model,
        "image_cache": image_cache,
        "compile": compiled,
        "crop_on": crop_on,
        "images_per_s": rows[-1]["images_per_s"],
        "data_wait": rows[-1]["data_wait"],
        "gpu_peak_gb": rows[-1].get("gpu_peak_gb"),
        "first_epoch_images_per_s": rows[0]["images_per_s"],
        "image_cache_s": metrics.get("image_cache_s"),
        "steps_s": metrics.get("steps_s"),
        "wall_s": time.perf_counter() - tick,
    }


TIMM_LINE = re.compile(r"Train: (\d+) \[.*?\(\s*([\d.]+)s,\s*([\d.]+)/s\).*?Data: [\d.]+ \(([\d.]+)\)")


def timm_run(train_py: Path, data: Path, work: Path, model: str, batch: int, workers: int, compiled: bool) -> dict:
    out_dir = work / "timm"
    cmd = [
        sys.executable,
        str(train_py),
        "--data-dir",
        str(data),
        "--train-split",
        "train",
        "--val-split",
        "val",
        "--model",
        model,
        "--num-classes",
        "10",
        "--img-size",
        "224",
        "-b",
        str(batch),
        "--epochs",
        "2",
        "--amp",
        "--amp-dtype",
        "bfloat16",
        "--channels-last",
        "-j",
        str(workers),
        "--log-interval",
        "5",
        "--opt",
        "adamw",
        "--lr",
        "1e-3",
        "--warmup-epochs",
        "0",
        "--output",
        str(out_dir),
        "--experiment",
        f"{model}{'-compiled' if compiled else ''}",
    ] + (["--torchcompile"] if compiled else [])
    tick = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode:
        raise RuntimeError(f"timm train.py failed: {text[-3000:]}")
    last = {}  # epoch -> its last log line's running averages (step seconds, img/s, data seconds)
    for m in TIMM_LINE.finditer(text):
        last[int(m.group(1))] = (float(m.group(2)), float(m.group(3)), float(m.group(4)))
    step_s, rate, data_s = last[max(last)]
    return {
        "tool": "timm train.py",
        "model": model,
        "image_cache": False,
        "compile": compiled,
        "crop_on": "workers",
        "images_per_s": rate,
        "data_wait": data_s / step_s,
        "first_epoch_images_per_s": last[min(last)][1],
        "wall_s": time.perf_counter() - tick,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# GPU benchmark: {result['gpu']}",
        "",
        f"torch {result['torch']}, CUDA {result['cuda']}, {result['cpu_cores']} CPU cores; {result['date']}",
        "",
    ] + ([result["note"], ""] if "note" in result else [])
    if result.get("ladder"):
        lines += [
            "## Model alone (img/s, training, 224 px)",
            "",
            "| model | batch | fp32 (TF32) | bf16 | bf16 + channels_last | + compile |",
            "|---|---|---|---|---|---|",
        ]
        for name in MODELS:
            got = [r for r in result["ladder"] if r["model"] == name]
            if got:
                lines.append(
                    f"| {name} | {got[0]['batch']} | " + " | ".join(f"{r['images_per_s']:.0f}" for r in got) + " |"
                )
        lines.append("")
    if result.get("memory"):
        lines += [
            "## Peak GPU memory per batch size (GiB; bf16 + channels_last, 224 px, AdamW)",
            "",
            "| model | " + " | ".join(str(r["batch"]) for r in result["memory"] if r["model"] == MODELS[0]) + " |",
            "|---|" + "---|" * len([r for r in result["memory"] if r["model"] == MODELS[0]]),
        ]
        for name in MODELS:
            lines.append(
                f"| {name} | "
                + " | ".join(
                    "OOM" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
                    for r in result["memory"]
                    if r["model"] == name
                )
                + " |"
            )
        lines.append("")
    if result.get("pipeline"):
        extra = [k for k in ("call", "loader") if any(k in r for r in result["pipeline"])]  # merged records
        lines += [
            "## Whole runs on JPEG files (second epoch; bf16 + channels_last, batch "
            f"{result['batch']}, {result['workers']} loader workers)",
            "",
            "| " + "".join(f"{k} | " for k in extra) + "model | tool | image cache | crops made in | compile | "
            "img/s | waiting for data | peak GiB | run s |",
            "|---" * (len(extra) + 9) + "|",
        ]
        for r in result["pipeline"]:
            peak = r.get("gpu_peak_gb")
            lines.append(
                "| " + "".join(f"{r.get(k, '')} | " for k in extra) + f"{r['model']} | {r['tool']} | "
                f"{'yes' if r['image_cache'] else 'no'} | {r.get('crop_on', 'workers')} | "
                f"{'yes' if r['compile'] else 'no'} | {r['images_per_s']:.0f} | {r['data_wait']:.0%} | "
                f"{'' if peak is None else f'{peak:.2f}'} | {r['wall_s']:.0f} |"
            )
    lines += [
        f"- failed: {r['tool']} {r['model']} (crops {r['crop_on']}): {r['error'][-300:]}"
        for r in result.get("failed", [])
    ]
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict) -> None:
    write_results("gpu", result, markdown(result), out)


def add_ladder(result: dict, device, batch: int, compiled: bool) -> None:
    """The eager rungs, or the compiled one (whose first steps take a minute), into result["ladder"]."""
    rows = result.get("ladder", []) + ladder(device, 224, batch, 15, [c for c in LADDER if c[2] == compiled])
    result["ladder"] = sorted(
        rows, key=lambda r: (MODELS.index(r["model"]), LADDER.index((r["precision"], r["channels_last"], r["compile"])))
    )


def pipeline(result: dict, args, workers: int) -> None:
    """Whole runs: transferkit (its image cache; crops made in the loader workers, then on the GPU) and timm's
    train.py in turns first, then transferkit without its image cache."""
    tick = time.perf_counter()
    data = make_jpegs(args.work / "data", {"train": args.per_class, "val": 10, "test": 10})
    _say(f"made {args.per_class * 10 + 200} JPEGs in {time.perf_counter() - tick:.1f} s")
    result["pipeline"] = []
    models = args.models.split(",")
    runs = [
        run
        for model in models
        for run in (("ours", model, True, "workers"), ("ours", model, True, "device"))
        + ((("timm", model, False, "workers"),) if args.timm_train else ())
    ]
    runs += [("ours", model, False, "workers") for model in models if args.files]
    for tool, model, image_cache, crop_on in runs:
        try:  # one failed run (a device's first try of a path) still leaves the others' figures
            if tool == "ours":
                row = ours(
                    data,
                    args.work,
                    model,
                    args.batch,
                    workers,
                    image_cache,
                    args.compile_pipeline,
                    crop_on=crop_on,
                    profile=args.profile_steps,
                    out=args.out,
                )
            else:
                row = timm_run(args.timm_train, data, args.work, model, args.batch, workers, args.compile_pipeline)
        except Exception as err:  # noqa: BLE001 (a failed run, or output it could not read)
            _say(f"pipeline {tool} {model} cache={image_cache} crops={crop_on} FAILED: {err}")
            result.setdefault("failed", []).append(
                {"tool": tool, "model": model, "crop_on": crop_on, "error": str(err)}
            )
            continue
        result["pipeline"].append(row)
        _say(
            f"pipeline {row['tool']} {model} cache={row['image_cache']} crops={crop_on} compile={row['compile']}: "
            f"{row['images_per_s']:.0f} img/s, waiting for data {row['data_wait']:.0%}, {row['wall_s']:.0f} s"
        )
        write(args.out, result)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--timm-train", type=Path, help="timm's train.py (from a clone of pytorch-image-models)")
    args_parser.add_argument("--work", type=Path, default=Path("/tmp/transferkit-gpu-bench"))
    args_parser.add_argument("--parts", default="pipeline,ladder,memory,compile")
    args_parser.add_argument("--batch", type=int, default=256)
    args_parser.add_argument("--per-class", type=int, default=512, help="training JPEGs per class (10 classes)")
    args_parser.add_argument("--workers", type=int, default=None, help="loader workers (default: transferkit's own)")
    args_parser.add_argument("--models", default=",".join(MODELS), help="the pipeline's models, comma-separated")
    args_parser.add_argument(
        "--no-files", dest="files", action="store_false", help="pipeline: skip transferkit without its image cache"
    )
    args_parser.add_argument("--compile-pipeline", action="store_true", help="whole runs with torch.compile")
    args_parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="pipeline: transferkit's runs profile this many steps (--profile-steps); OUT/profile-RUN.txt",
    )
    args = args_parser.parse_args()
    from transferkit.core.machine import default_workers

    device = torch.device("cuda")
    workers = args.workers if args.workers is not None else default_workers(False, cuda=True)
    args.out.mkdir(parents=True, exist_ok=True)  # profile-RUN.txt files land there before the first results
    result = {
        "gpu": torch.cuda.get_device_name(device),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "date": time.strftime("%Y-%m-%d"),
        "batch": args.batch,
        "workers": workers,
    }
    parts = {
        "ladder": lambda: add_ladder(result, device, args.batch, compiled=False),
        "compile": lambda: add_ladder(result, device, args.batch, compiled=True),
        "memory": lambda: result.update(memory=memory(device, 224, [32, 64, 128, 256, 512])),
        "pipeline": lambda: pipeline(result, args, workers),
    }
    for part in args.parts.split(","):  # in the order given; each writes what it measured
        parts[part]()
        write(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
