"""Deployment formats side by side: one trained lite0, exported to every format transferkit writes.

`python benchmarks/deploy.py [--size 96] [--epochs 3] [--out DIR]` trains tf_efficientnet_lite0 (bundled
weights) on builtin:digits at SIZE px, exports it (ONNX, TorchScript, TFLite fp32/fp16/int8, TensorFlow
SavedModel), and writes deploy.json and deploy.md into DIR (default benchmarks/results/) with, per format:
file size (the SavedModel: its folder); latency at batch 1 (median of 50 calls after 5 warm-up calls);
img/s at batch 32 (TFLite takes one image a call: 32 calls); top-1 agreement with PyTorch eager fp32 and
test accuracy, both on the whole test split. Every runner gets the same preprocessed tensors, so the
figures are the model's alone (no decoding; the SavedModel's include the pipe to its TensorFlow child process,
the way transferkit runs it); PyTorch eager runs the bundle's model as `predict` does not (no
BatchNorm folding, fp32), the reference the exports are checked against.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import machine, parser, write_results


def _timed(run, x: np.ndarray, calls: int) -> float:
    for _ in range(5):
        run(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--size", type=int, default=96)
    args_parser.add_argument("--epochs", type=int, default=3)
    args = args_parser.parse_args()

    import transferkit
    from transferkit.core.config import TrainConfig
    from transferkit.data.sources import config_data
    from transferkit.data.transforms import eval_transform
    from transferkit.deploy.bundle import load_bundle
    from transferkit.deploy.export import export
    from transferkit.deploy.runners import onnx_runner, torchscript_runner
    from transferkit.deploy.savedmodel import saved_model_runner
    from transferkit.deploy.tflite import tflite_runner

    work = Path(tempfile.mkdtemp(prefix="deploy-"))
    run = transferkit.train(
        data="builtin:digits",
        img_size=args.size,
        epochs=args.epochs,
        batch_size=32,
        runs_dir=str(work),
        quiet=True,
        workers=0,
        html_report=False,
    )
    model, meta = load_bundle(run.dir)
    model.eval()
    data = config_data(TrainConfig.load(run.dir / "config.yaml"), run.dir / "split.json")
    transform = eval_transform(transferkit.data.preprocessing.preprocessing_from_dict(meta["preprocessing"]))
    test = data.splits["test"]
    x = torch.stack([transform(data.read(ref)) for ref, _ in test]).numpy()
    labels = np.array([meta["classes"].index(label) for _, label in test])

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    arms = {"PyTorch eager (fp32)": (eager, run.dir / "best" / "model.safetensors", None)}
    for name, fmt, quantize, runner in (
        ("TorchScript", "torchscript", "none", torchscript_runner),
        ("ONNX Runtime", "onnx", "none", onnx_runner),
        ("TFLite fp32", "tflite", "none", tflite_runner),
        ("TFLite fp16", "tflite", "fp16", tflite_runner),
        ("TFLite int8", "tflite", "int8", tflite_runner),
        ("TensorFlow SavedModel", "saved_model", "none", saved_model_runner),
    ):
        start = time.perf_counter()
        result = export(run.dir, fmt, quantize=quantize, tolerance=1.0)  # measured here, not refused
        path = Path(result["path"])
        arms[name] = (runner(path), path, round(time.perf_counter() - start, 1))
    want = np.concatenate([eager(x[i : i + 32]) for i in range(0, len(x), 32)]).argmax(1)
    rows = []
    for name, (run_fn, path, seconds) in arms.items():
        got = np.concatenate([run_fn(x[i : i + 32]) for i in range(0, len(x), 32)]).argmax(1)
        rows.append(
            {
                "format": name,
                "file_mb": round(_size(path) / 2**20, 2),
                "export_s": seconds,
                "latency_ms_b1": round(1000 * _timed(run_fn, x[:1], 50), 2),
                "img_s_b32": round(32 / _timed(run_fn, x[:32], 10), 1),
                "top1_agreement": round(float((got == want).mean()), 4),
                "test_accuracy": round(float((got == labels).mean()), 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    where = machine()
    meta_out = {
        "machine": f"{where['cpu']}, {where['cores']} cores, torch {where['torch']}, Python {where['python']}",
        "host": where,
        "model": "tf_efficientnet_lite0",
        "data": "builtin:digits",
        "img_size": args.size,
        "epochs": args.epochs,
        "test_images": len(test),
    }
    lines = [
        f"# Deployment formats ({meta_out['machine']})",
        "",
        f"tf_efficientnet_lite0 fine-tuned on builtin:digits at {args.size} px ({args.epochs} epochs); "
        f"agreement and accuracy on the {len(test)} test images; `python benchmarks/deploy.py "
        f"--size {args.size} --epochs {args.epochs}`.",
        "",
        "| format | file (MB) | export (s) | latency, batch 1 (ms) | img/s, batch 32 | top-1 agreement with "
        "PyTorch | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['format']} | {r['file_mb']} | {r['export_s'] if r['export_s'] is not None else '-'} | "
        f"{r['latency_ms_b1']} | {r['img_s_b32']} | {r['top1_agreement']:.4f} | {r['test_accuracy']:.4f} |"
        for r in rows
    ]
    write_results("deploy", {"meta": meta_out, "rows": rows}, "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
