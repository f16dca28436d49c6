"""Text classification on builtin:fortunes (five topics of Debian's fortunes; fixed split 472/67/135):
baselines against transferkit's strategies on the bundled MiniLM-L6 encoder.

`python benchmarks/text.py [--arms tfidf,embed-lr,linear-probe,lp-ft,finetune] [--seeds 3] [--epochs 6]`
writes text.json and text.md into --out (default benchmarks/results/). Each arm runs in its own process (its
peak RSS is its own):
- tfidf: TF-IDF (word 1-2 grams, sublinear tf) + logistic regression (scikit-learn), C picked on val;
- embed-lr: the frozen encoder's mean-pooled embeddings + logistic regression, C picked on val;
- linear-probe, lp-ft, finetune: `transferkit.train` with its defaults (best epoch by val accuracy).
Per arm: test accuracy and macro-F1 (mean ± std over seeds), training texts/s (training texts x epochs /
training seconds; embedding once for the baselines), inference texts/s (predict on the test texts, batch 32,
after one warm-up batch), peak RSS.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import SUPPRESS
from pathlib import Path

from harness import machine, parser, read_results, write_results

TRAINED = ("linear-probe", "lp-ft", "finetune")
ARMS = ("tfidf", "embed-lr") + TRAINED


def texts_of(split: str) -> tuple[list[str], list[str]]:
    from transferkit.data.sources import load_data

    data = load_data("builtin:fortunes")
    return [data.read(ref) for ref, _ in data.splits[split]], [label for _, label in data.splits[split]]


def _logistic(train_x, train_y, val_x, val_y, seed: int):
    """Logistic regression with C picked on val from a small grid."""
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in (0.1, 1.0, 10.0, 100.0):
        model = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(train_x, train_y)
        score = model.score(val_x, val_y)
        if best is None or score > best[0]:
            best = (score, model)
    return best[1]


def baseline(arm: str, seed: int) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    (tr, tr_y), (va, va_y), (te, te_y) = texts_of("train"), texts_of("val"), texts_of("test")
    tick = time.perf_counter()
    if arm == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorize = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit(tr).transform
    else:  # embed-lr: the encoder transferkit fine-tunes, frozen, mean-pooled
        import torch

        from transferkit.data.texts import TokenIds
        from transferkit.models.text import build_text_classifier

        model, _, prep = build_text_classifier("all-minilm-l6-v2", "auto", 2, 128, "linear", 8, 0.0)
        tokens, encoder = TokenIds(prep.tokenizer, prep.max_length, prep.pad_id), model.backbone.eval()

        def vectorize(texts):
            with torch.inference_mode():
                return torch.cat([encoder(tokens.batch(texts[i : i + 32])) for i in range(0, len(texts), 32)]).numpy()

    train_x = vectorize(tr)
    clf = _logistic(train_x, tr_y, vectorize(va), va_y, seed)
    train_s = time.perf_counter() - tick
    vectorize(te[:32])
    tick = time.perf_counter()
    pred = clf.predict(vectorize(te))
    infer_s = time.perf_counter() - tick
    return {
        "accuracy": accuracy_score(te_y, pred),
        "macro_f1": f1_score(te_y, pred, average="macro"),
        "train_texts_per_s": len(tr) / train_s,
        "infer_texts_per_s": len(te) / infer_s,
        "epochs": None,
    }


def trained(arm: str, seed: int, epochs: int, work: Path) -> dict:
    import transferkit
    from transferkit.core.progress import Reporter

    run = transferkit.train(
        data="builtin:fortunes",
        strategy=arm,
        epochs=epochs,
        seed=seed,
        quiet=True,
        html_report=False,
        runs_dir=str(work),
        name=f"{arm}-{seed}",
        cache_dir=str(work / f"cache-{arm}-{seed}"),  # each run pays its own embedding pass
        report=Reporter(silent=True),
    )
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["epoch_s"] for r in rows) + run.metrics["feature_cache_s"]
    texts, _ = texts_of("test")
    predictor = transferkit.load(run.dir)
    predictor.predict_proba(texts[:32])
    tick = time.perf_counter()
    predictor.predict_proba(texts)
    infer_s = time.perf_counter() - tick
    n_train = len(texts_of("train")[0])
    return {
        "accuracy": run.metrics["test"]["accuracy"],
        "macro_f1": run.metrics["test"]["macro_f1"],
        "train_texts_per_s": n_train * len(rows) / train_s,
        "infer_texts_per_s": len(texts) / infer_s,
        "epochs": len(rows),
        "best_epoch": run.metrics["best"]["epoch"],
    }


def child(arm: str, seed: int, epochs: int, work: str) -> None:
    """One arm in this process; prints its row as JSON with the process's peak RSS."""
    import resource

    row = baseline(arm, seed) if arm not in TRAINED else trained(arm, seed, epochs, Path(work))
    row.update(arm=arm, seed=seed, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(row))


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        line = {"arm": arm, "seeds": len(mine)}
        for key in ("accuracy", "macro_f1", "train_texts_per_s", "infer_texts_per_s", "peak_rss_mb"):
            values = [r[key] for r in mine]
            line[key] = (statistics.fmean(values), statistics.pstdev(values))
        out.append(line)
    return out


def markdown(lines: list[dict], meta: dict) -> str:
    text = [
        "# Text classification: builtin:fortunes (5 topics; train/val/test 472/67/135)\n",
        f"{meta['machine']}; {meta['seeds']} seeds; transferkit arms {meta['epochs']} epochs with defaults "
        f"(all-minilm-l6-v2, max 128 tokens, batch 32); {meta['date']}.\n",
        "| arm | test accuracy | macro-F1 | train texts/s | predict texts/s | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for line in lines:
        a, f, tr, inf, rss = (
            line[k] for k in ("accuracy", "macro_f1", "train_texts_per_s", "infer_texts_per_s", "peak_rss_mb")
        )
        text.append(
            f"| {line['arm']} | {a[0]:.3f} ± {a[1]:.3f} | {f[0]:.3f} ± {f[1]:.3f} | {tr[0]:.0f} | "
            f"{inf[0]:.0f} | {rss[0]:.0f} |"
        )
    return "\n".join(text) + "\n"


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--arms", default=",".join(ARMS))
    args_parser.add_argument("--seeds", type=int, default=3)
    args_parser.add_argument("--epochs", type=int, default=6)
    args_parser.add_argument("--keep", action="store_true", help="keep the other arms' rows of OUT/text.json")
    args_parser.add_argument("--child", nargs=4, metavar=("ARM", "SEED", "EPOCHS", "WORK"), help=SUPPRESS)
    args = args_parser.parse_args()
    if args.child:
        arm, seed, epochs, work = args.child
        return child(arm, int(seed), int(epochs), work)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for arm in args.arms.split(","):
            for seed in range(args.seeds):
                done = subprocess.run(
                    [sys.executable, __file__, "--child", arm, str(seed), str(args.epochs), work],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"[text-bench] {arm} seed {seed}: accuracy {rows[-1]['accuracy']:.3f}", flush=True)
    where = machine()
    meta = {
        "machine": f"{where['cpu']}, {where['cores']} cores, {where['python']}",
        "host": where,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "date": where["date"],
    }
    kept = read_results("text", args.out)
    if args.keep and kept is not None:
        rows = [r for r in kept["rows"] if r["arm"] not in args.arms.split(",")] + rows
        rows.sort(key=lambda r: ARMS.index(r["arm"]))
    lines = summary(rows)
    write_results("text", {"meta": meta, "rows": rows, "summary": lines}, markdown(lines, meta), args.out)
    print(markdown(lines, meta))


if __name__ == "__main__":
    main()
