"""Tuning and ranking, measured: does a study beat the defaults, what does the shared feature cache save,
and does LogME order backbones as fine-tuning does?

`python benchmarks/tune.py [--parts tuned,cache,rank] [--trials 16] [--seeds 3]` writes
tune.json and tune.md into --out (default benchmarks/results/). Run it alone: it times things on a small machine.

1. tuned: builtin:textures, 5 training images per class (seeds 0-2: each seed picks other images),
   `transferkit train` with the defaults against the best config of a `tune` study of N trials on the
   same images; test accuracy mean ± std over the seeds (trials never see the test split).
2. cache: a probe-heavy study (strategy linear-probe fixed, 8 trials, builtin:faces, 10 epochs) from a
   cold cache, with the feature cache (features extracted once for the study) and without it (the
   frozen backbone runs every epoch of every trial); the study's wall time each way.
3. rank: for every backbone with weights here at 64 and 96 px, on digits, faces and textures (20
   training images per class), LogME on frozen features against the test accuracy of a default
   fine-tune; Kendall's tau per dataset.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from harness import cpu_name, parser, write_results

QUIET = {"quiet": True, "html_report": False, "precision": "fp32"}


def tuned(work: Path, trials: int, seeds: int) -> dict:
    import transferkit
    from transferkit.core.config import TrainConfig
    from transferkit.core.progress import Reporter
    from transferkit.tuning.study import tune

    rows = []
    for seed in range(seeds):
        base = TrainConfig(
            data="builtin:textures",
            shots=5,
            seed=seed,
            runs_dir=str(work / "runs"),
            cache_dir=str(work / "cache"),
            **QUIET,
        )
        tick = time.perf_counter()
        default = transferkit.train(base.replace(name=f"default-{seed}"), report=Reporter(silent=True))
        default_s = time.perf_counter() - tick
        tick = time.perf_counter()
        study = tune(base.replace(name=f"study-{seed}"), trials, fixed={"precision"}, report=Reporter(silent=True))
        rows.append(
            {
                "seed": seed,
                "default_test_accuracy": default.metrics["test"]["accuracy"],
                "tuned_test_accuracy": study["best"]["test"]["accuracy"],
                "default_s": default_s,
                "study_s": time.perf_counter() - tick,
                "best_params": study["best"]["params"],
                "best_val_accuracy": study["best"]["val_accuracy"],
            }
        )
        print(
            f"[tune-bench] seed {seed}: default {rows[-1]['default_test_accuracy']:.3f}, tuned "
            f"{rows[-1]['tuned_test_accuracy']:.3f} ({rows[-1]['study_s']:.0f} s)",
            flush=True,
        )
    return {
        "data": "builtin:textures",
        "shots": 5,
        "trials": trials,
        "rows": rows,
        **{f"{k}_mean": statistics.fmean(r[f"{k}_test_accuracy"] for r in rows) for k in ("default", "tuned")},
        **{f"{k}_std": statistics.pstdev(r[f"{k}_test_accuracy"] for r in rows) for k in ("default", "tuned")},
    }


def cache(work: Path, trials: int = 8) -> dict:
    from transferkit.core.config import TrainConfig
    from transferkit.core.progress import Reporter
    from transferkit.tuning.study import tune

    out = {}
    for on in (True, False):
        config = TrainConfig(
            data="builtin:faces",
            strategy="linear-probe",
            epochs=10,
            feature_cache=on,
            cache_dir=str(work / f"cache-{on}"),
            runs_dir=str(work / "runs"),
            name=f"probe-cache-{on}",
            **QUIET,
        )
        tick = time.perf_counter()
        study = tune(
            config, trials, fixed={"strategy", "epochs", "feature_cache", "precision"}, report=Reporter(silent=True)
        )
        out["with" if on else "without"] = {
            "study_s": time.perf_counter() - tick,
            **study["feature_cache"],
            "best_val_accuracy": study["best"]["val_accuracy"],
        }
        print(
            f"[tune-bench] probe study, feature cache {on}: {out['with' if on else 'without']['study_s']:.0f} s",
            flush=True,
        )
    return {
        "data": "builtin:faces",
        "trials": trials,
        "epochs": 10,
        **out,
        "speedup": out["without"]["study_s"] / out["with"]["study_s"],
    }


def rank_vs_finetune(work: Path) -> dict:
    from scipy.stats import kendalltau

    import transferkit
    from transferkit.core.config import TrainConfig
    from transferkit.core.progress import Reporter
    from transferkit.models.weights import available_models
    from transferkit.tuning.rank import rank

    models = [row["name"] for row in available_models()]
    out = []
    for data in ("builtin:digits", "builtin:faces", "builtin:textures"):
        base = TrainConfig(data=data, shots=20, runs_dir=str(work / "runs"), cache_dir=str(work / "cache"), **QUIET)
        scores = rank(data, models, img_sizes=[64, 96], config=base)["rows"]
        for row in scores:
            run = transferkit.train(
                base.replace(
                    model=row["model"], img_size=row["img_size"], name=f"ft-{data[8:]}-{row['model']}-{row['img_size']}"
                ),
                report=Reporter(silent=True),
            )
            row["finetune_test_accuracy"] = run.metrics["test"]["accuracy"]
        tau = kendalltau([r["logme"] for r in scores], [r["finetune_test_accuracy"] for r in scores])
        out.append({"data": data, "rows": scores, "kendall_tau": tau.statistic, "p_value": tau.pvalue})
        print(f"[tune-bench] {data}: Kendall tau {tau.statistic:.3f} over {len(scores)} candidates", flush=True)
    return {"shots": 20, "datasets": out, "mean_tau": statistics.fmean(d["kendall_tau"] for d in out)}


def markdown(result: dict) -> str:
    lines = [f"# Tuning and ranking: {result['cpu']}, {result['date']}", ""]
    if "tuned" in result:
        t = result["tuned"]
        lines += [
            f"## Tuned ({t['trials']} trials) against the defaults: {t['data']}, {t['shots']}-shot, "
            f"{len(t['rows'])} seeds",
            "",
            "| seed | default test acc | tuned test acc | study s | best params |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['seed']} | {r['default_test_accuracy']:.3f} | {r['tuned_test_accuracy']:.3f} | "
            f"{r['study_s']:.0f} | {json.dumps(r['best_params'])} |"
            for r in t["rows"]
        ]
        lines += [
            "",
            f"mean ± std: default {t['default_mean']:.3f} ± {t['default_std']:.3f}, tuned "
            f"{t['tuned_mean']:.3f} ± {t['tuned_std']:.3f}",
            "",
        ]
    if "cache" in result:
        c = result["cache"]
        lines += [
            f"## Probe-heavy study ({c['trials']} linear-probe trials, {c['epochs']} epochs, {c['data']}, cold cache)",
            "",
            "| feature cache | study s | hits | misses |",
            "|---|---|---|---|",
        ]
        lines += [f"| {k} | {c[k]['study_s']:.0f} | {c[k]['hits']} | {c[k]['misses']} |" for k in ("with", "without")]
        lines += ["", f"speed-up with the shared cache: {c['speedup']:.1f}x", ""]
    if "rank" in result:
        r = result["rank"]
        lines += [
            f"## LogME against fine-tuned test accuracy ({r['shots']} images per class)",
            "",
            "| data | candidates | Kendall tau | p |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {d['data']} | {len(d['rows'])} | {d['kendall_tau']:.3f} | {d['p_value']:.3f} |" for d in r["datasets"]
        ]
        lines += ["", f"mean tau: {r['mean_tau']:.3f}", ""]
        for d in r["datasets"]:
            lines += [
                f"{d['data']}: "
                + "; ".join(
                    f"{x['model']}@{x['img_size']} LogME {x['logme']:.3f} acc {x['finetune_test_accuracy']:.3f}"
                    for x in d["rows"]
                ),
                "",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--parts", default="tuned,cache,rank")
    args_parser.add_argument("--trials", type=int, default=16)
    args_parser.add_argument("--seeds", type=int, default=3)
    args = args_parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tk-tune-bench-"))
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "work": str(work)}
    parts = {
        "tuned": lambda: tuned(work, args.trials, args.seeds),
        "cache": lambda: cache(work),
        "rank": lambda: rank_vs_finetune(work),
    }
    for part in args.parts.split(","):
        result[part] = parts[part]()
        write_results("tune", result, markdown(result), args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
