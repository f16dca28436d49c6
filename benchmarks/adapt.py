"""Domain adaptation on the builtin shift: printed digits (builtin:fontdigits, labelled) to handwritten
ones (builtin:digits, unlabelled; their labels score the result only).

`python benchmarks/adapt.py [--methods none,dann,cdan,mcc,coral] [--seeds 3] [--epochs 8] [--name adapt]`
writes NAME.json and NAME.md into --out (default benchmarks/results/): per method, the target accuracy (mean ±
std over seeds) of the checkpoint each label-free rule picks (source validation accuracy; lowest target
prediction entropy; lowest proxy A-distance) against the oracle (the best target accuracy over the epochs, which
needs target labels).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from harness import cpu_name, parser, write_results

KEYS = ("by_source_val", "by_entropy", "by_pad", "oracle", "last")
"""Per run: the target accuracy of the epoch each rule picks (source val accuracy; lowest target prediction
entropy; lowest proxy A-distance), of the best epoch (the oracle: needs target labels), of the last."""


def one(method: str, seed: int, epochs: int, img_size: int, work: Path, **overrides) -> dict:
    import transferkit
    from transferkit.core.progress import Reporter

    tick = time.perf_counter()
    run = transferkit.train(
        data="builtin:fontdigits",
        target="builtin:digits",
        target_eval="builtin:digits",
        adapt=method,
        seed=seed,
        epochs=epochs,
        img_size=img_size,
        precision="fp32",
        quiet=True,
        html_report=False,
        runs_dir=str(work),
        name=f"{method}-{seed}",
        cache_dir=str(work / "cache"),
        report=Reporter(silent=True),
        **overrides,
    )
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]

    def lowest(key):  # the target accuracy of the epoch where a label-free score is lowest
        scored = [r for r in rows if r.get(key) is not None]
        return min(scored, key=lambda r: r[key])["target_accuracy"] if scored else None

    return {
        "method": method,
        "seed": seed,
        "seconds": time.perf_counter() - tick,
        "curve": [r["target_accuracy"] for r in rows],
        "source_val": [r["val_accuracy"] for r in rows],
        "entropy": [r["target_entropy"] for r in rows],
        "pad": [r["proxy_a_distance"] for r in rows],
        "by_source_val": max(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["target_accuracy"],
        "by_entropy": lowest("target_entropy"),
        "by_pad": lowest("proxy_a_distance"),
        "oracle": max(r["target_accuracy"] for r in rows),
        "last": rows[-1]["target_accuracy"],
    }


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        line = {"method": method, "seeds": len(mine)}
        for key in KEYS:
            values = [r[key] for r in mine if r[key] is not None]
            if values:
                line[key] = (statistics.fmean(values), statistics.pstdev(values))
        out.append(line)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"# Domain adaptation: builtin:fontdigits -> builtin:digits ({result['cpu']}, {result['date']})",
        "",
        f"{result['epochs']} epochs, {result['img_size']} px, lite0 finetune defaults; target accuracy on all "
        "1,797 handwritten digits, mean ± std over seeds",
        "",
        "| method | picked by source val | by target entropy | by proxy A-distance | oracle (target labels) "
        "| last epoch |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        cell = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" if k in s else "-" for k in KEYS]
        lines.append(f"| {s['method']} | " + " | ".join(cell) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--methods", default="none,dann,cdan,mcc,coral")
    args_parser.add_argument("--seeds", type=int, default=3)
    args_parser.add_argument("--epochs", type=int, default=8)
    args_parser.add_argument("--img-size", type=int, default=32)
    args_parser.add_argument("--name", default="adapt", help="results name, e.g. adapt-24epochs (default adapt)")
    args_parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config field for every run, e.g. --set adapt_weight=0.3 (repeatable)",
    )
    args = args_parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    work = Path(tempfile.mkdtemp(prefix="tk-adapt-bench-"))
    result = {
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "epochs": args.epochs,
        "img_size": args.img_size,
        "overrides": overrides,
        "runs": [],
    }
    for seed in range(args.seeds):
        for method in args.methods.split(","):
            row = one(method, seed, args.epochs, args.img_size, work, **overrides)
            result["runs"].append(row)
            result["summary"] = summary(result["runs"])
            write_results(args.name, result, markdown(result), args.out)
            print(
                f"[adapt-bench] {method} seed {seed}: target {row['by_source_val']:.3f} (source val pick), "
                f"oracle {row['oracle']:.3f}, {row['seconds']:.0f} s",
                flush=True,
            )
    print(markdown(result))


if __name__ == "__main__":
    main()
