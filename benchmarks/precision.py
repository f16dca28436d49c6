"""fp32 against bf16 autocast on this CPU: speed per kind of work, equal results, and what auto chose.

`make bench-precision` (or `python benchmarks/precision.py [--quick] [--out DIR]`) writes precision.json
and precision.md into DIR (default benchmarks/results/). Speed comes from the same probe `precision auto` uses
(`transferkit.models.precision.measure`: a copy of the model, one warm-up batch per precision, then the best of
alternating timed batches), for efficientnet_lite0 at 96 px and a ResNet-50 at 128 px. "train" is one forward +
backward of the whole model; "infer" is the BN-folded eval forward that feature extraction and predict run.

Equal results (lite0, ImageNet weights; ResNet-50 has no weights offline, so speed only): each builtin
dataset is fine-tuned in fp32 and in bf16 (same seed), and the fp32 model's test split is predicted in
both precisions: test accuracy of each, and the share of test images whose top-1 agrees.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import cpu_flags, machine, machine_line, parser, write_results

MODELS = {"efficientnet_lite0": (96, 32, "auto"), "resnet50": (128, 16, "none")}  # size, batch, weights


def speeds(quick: bool) -> list[dict]:
    from transferkit.models.classifier import build_classifier
    from transferkit.models.precision import Workload, choose, measure

    rows = []
    for name, (size, batch, weights) in MODELS.items():
        size, batch = (size // 2, batch // 4) if quick else (size, batch)
        model, _, _ = build_classifier(name, weights, 10, img_size=size)
        workload = Workload(model, name, (batch, 3, size, size))
        for kind in ("train", "infer"):
            rate = measure(workload, kind, reps=1 if quick else 3)
            auto = choose("auto", torch.device("cpu"), kind, workload)
            rows.append(
                {
                    "model": name,
                    "kind": kind,
                    "img_size": size,
                    "batch": batch,
                    **rate,
                    "bf16_speedup": rate["bf16"] / rate["fp32"],
                    "auto": auto.precision,
                    "auto_reason": auto.reason,
                }
            )
            print(
                f"[precision] {name} {kind}: fp32 {rate['fp32']:.1f}, bf16 {rate['bf16']:.1f} img/s; "
                f"auto {auto.precision}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def results(quick: bool, work: Path) -> list[dict]:
    import transferkit
    from transferkit.data.sources import load_data

    rows = []
    # digits: 30 shots a class keeps emulated bf16 (8-33x slower than fp32 on an AVX2 CPU) in minutes
    cases = {"builtin:faces": {}, "builtin:textures": {}, "builtin:digits": {"shots": 30}}
    for data, extra in list(cases.items())[: 1 if quick else 3]:
        common = dict(
            data=data,
            strategy="finetune",
            epochs=1 if quick else 5,
            runs_dir=str(work),
            quiet=True,
            html_report=False,
            cache_dir=str(work / "cache"),
            **extra,
        )
        runs = {p: transferkit.train(precision=p, name=f"{data[8:]}-{p}", **common) for p in ("fp32", "bf16")}
        split = load_data(data, split_file=str(runs["fp32"].dir / "split.json")).splits["test"]
        images = [load_data(data, split_file=str(runs["fp32"].dir / "split.json")).read(ref, 3) for ref, _ in split]
        top1 = {
            p: transferkit.load(runs["fp32"].dir, precision=p).predict_proba(images).argmax(1) for p in ("fp32", "bf16")
        }
        rows.append(
            {
                "data": data + "".join(f" --{k} {v}" for k, v in extra.items()),
                "test_images": len(split),
                "test_accuracy_trained_fp32": runs["fp32"].metrics["test"]["accuracy"],
                "test_accuracy_trained_bf16": runs["bf16"].metrics["test"]["accuracy"],
                "predict_top1_agreement": float((top1["fp32"] == top1["bf16"]).mean()),
            }
        )
        print(f"[precision] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']}",
        f"CPU flags: {report['flags']}",
        "",
        "| model | work | fp32 img/s | bf16 img/s | bf16 / fp32 | auto chose | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["speed"]:
        work = {"train": "train step (fwd + bwd)", "infer": "feature extraction / predict (folded BN)"}[r["kind"]]
        lines.append(
            f"| {r['model']} {r['img_size']} px, batch {r['batch']} | {work} | {r['fp32']:.1f} | "
            f"{r['bf16']:.1f} | {r['bf16_speedup']:.2f}x | {r['auto']} | {r['auto_reason']} |"
        )
    lines += [
        "",
        "| data (lite0 fine-tune) | test images | test acc, trained fp32 | test acc, trained bf16 | "
        "predict top-1 agreement bf16 vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['data']} | {r['test_images']} | {r['test_accuracy_trained_fp32']:.3f} | "
            f"{r['test_accuracy_trained_bf16']:.3f} | {r['predict_top1_agreement']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from transferkit.models.precision import cpu_has_native_bf16

    args = parser(__doc__, quick=True).parse_args()
    tick = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transferkit-precision-") as work:
        report = {
            "machine": machine_line(machine()),
            "flags": " ".join(cpu_flags()),
            "native_bf16": cpu_has_native_bf16(),
            "quick": args.quick,
            "speed": speeds(args.quick),
            "results": results(args.quick, Path(work)),
        }
    report["seconds"] = time.perf_counter() - tick
    write_results("precision", report, markdown(report), args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
