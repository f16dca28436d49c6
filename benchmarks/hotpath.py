"""The training hot path, two copies of the code side by side: B1's whole process and the fine-tune loop's img/s.

`python benchmarks/hotpath.py --old /tmp/old/src --new src [--repeats 3] [--name hotpath-CPU-DATE]` writes
benchmarks/results/NAME.json and NAME.md. OLD and NEW are two `src` folders (e.g. a `git worktree` of the
commit before a change, and this checkout); each run imports its copy through PYTHONPATH (checked first).

- B1 (bench.py): transferkit's side only, `transferkit train FOLDER --strategy linear-probe --epochs 10
  --img-size 96` over bench.py's 2,550 JPEGs, a whole process with cold caches; its wall seconds.
- fine-tune: B2's transferkit run (bench.py) as a command, `--strategy full --epochs 2 --img-size 96
  --lr 1e-4` over its 600 JPEGs; images_per_s of the last epoch from runs/NAME/metrics.jsonl.
- CPU seconds (user + system) of both processes beside: they move less than wall time when other programs
  share the cores.

Rounds alternate which copy goes first (old, new; new, old; ...), so a load that comes and goes on the
machine falls on both; every figure is kept, and the table gives median and spread (min-max).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import b1_command, b1_folder, b2_command, b2_folder
from harness import cpu_flags, cpu_name, machine, machine_line, parser, read_results, write_results

MEASURES = {
    "b1_seconds": ("B1 whole process (s)", "lower is better"),
    "finetune_images_per_s": ("fine-tune last epoch (img/s)", "higher is better"),
    "b1_cpu_seconds": ("B1 whole process, CPU (s)", "lower is better"),
    "finetune_process_cpu_s": ("fine-tune whole process, CPU (s)", "lower is better"),
}


def imported_from(src: Path) -> str:
    """The transferkit __init__.py a process with PYTHONPATH=src imports (it must lie under src)."""
    out = subprocess.run(
        [sys.executable, "-c", "import transferkit; print(transferkit.__file__)"],
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        check=True,
    )
    path = out.stdout.strip()
    if not Path(path).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"PYTHONPATH={src} imports transferkit from {path}, not from that copy")
    return path


def timed(command: list[str], src: Path, cwd: Path, threads: int | None) -> tuple[float, float, str]:
    """Run `command` with PYTHONPATH=src; its wall seconds, its CPU seconds (user + system, its loader workers
    included) and stdout (fails loudly on a non-zero exit). CPU seconds move less than wall seconds when other
    programs share the cores. `threads`: torch threads (--threads and OMP_NUM_THREADS), or transferkit's own."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    if threads:
        command = [*command, "--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick = time.perf_counter()
    out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command[:5])} failed (PYTHONPATH={src}): {out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, out.stdout


def one_side(side: str, src: Path, round_no: int, folders: dict[str, Path], work: Path, threads: int | None) -> dict:
    """B1's process, then the fine-tune command, for one copy of the code; fresh run names and caches."""
    load_before = os.getloadavg()[0]
    b1_name = f"b1-{side}-{round_no}"
    seconds, cpu_seconds, stdout = timed(b1_command(folders["b1"], work, b1_name), src, work, threads)
    accuracy = json.loads(stdout.strip().splitlines()[-1])["test_accuracy"]
    ft_name = f"ft-{side}-{round_no}"
    ft_seconds, ft_cpu_seconds, _ = timed(b2_command(folders["b2"], work, ft_name), src, work, threads)
    lines = (work / "runs" / ft_name / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    for name in (b1_name, ft_name):  # keep /tmp small: only the figures are needed
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        shutil.rmtree(work / f"cache-{name}", ignore_errors=True)
    return {
        "side": side,
        "round": round_no,
        "b1_seconds": seconds,
        "b1_cpu_seconds": cpu_seconds,
        "b1_test_accuracy": accuracy,
        "finetune_images_per_s": epochs[-1]["images_per_s"],
        "finetune_epoch_images_per_s": [row["images_per_s"] for row in epochs],
        "finetune_process_s": ft_seconds,
        "finetune_process_cpu_s": ft_cpu_seconds,
        "load_1min_before": load_before,
    }


def summary(runs: list[dict]) -> dict:
    """Per side and measure: median, min, max, spread (max - min) and spread as a share of the median."""
    out = {}
    for side in ("old", "new"):
        mine = [run for run in runs if run["side"] == side]
        out[side] = {}
        for key in MEASURES:
            values = [run[key] for run in mine]
            if not values:
                continue
            median = statistics.median(values)
            out[side][key] = {
                "median": median,
                "min": min(values),
                "max": max(values),
                "spread": max(values) - min(values),
                "spread_of_median": (max(values) - min(values)) / median,
                "n": len(values),
            }
    return out


def markdown(result: dict) -> str:
    stats = result["summary"]
    lines = [
        f"# Training hot path, old against new: {result['machine_line']}, {result['machine']['date']}",
        "",
        f"old = {result['old']['label']}; new = {result['new']['label']}. {result['note']}",
        "",
    ]
    if result.get("threads"):
        lines += [f"Both runs with {result['threads']} torch thread(s) (--threads, OMP_NUM_THREADS).", ""]
    if result.get("context"):  # what was seen while it ran (added afterwards with --context)
        lines += [result["context"], ""]
    lines += [
        "| measure | old median | old min-max | new median | new min-max | new / old |",
        "|---|---|---|---|---|---|",
    ]
    for key, (title, better) in MEASURES.items():
        if key not in stats["old"] or key not in stats["new"]:
            continue
        old, new = stats["old"][key], stats["new"][key]
        lines.append(
            f"| {title}, {better}, n={old['n']}/{new['n']} | {old['median']:.2f} | {old['min']:.2f}-{old['max']:.2f} "
            f"| {new['median']:.2f} | {new['min']:.2f}-{new['max']:.2f} | {new['median'] / old['median']:.3f} |"
        )
    lines += [
        "",
        "Every run, in the order run (load = 1-minute load average just before the side started):",
        "",
        "| round | side | B1 s | B1 CPU s | B1 test acc | fine-tune img/s, per epoch | fine-tune process s "
        "| fine-tune CPU s | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        per_epoch = ", ".join(f"{rate:.1f}" for rate in run["finetune_epoch_images_per_s"])
        lines.append(
            f"| {run['round']} | {run['side']} | {run['b1_seconds']:.2f} | {run['b1_cpu_seconds']:.2f} | "
            f"{run['b1_test_accuracy']:.3f} | {per_epoch} | {run['finetune_process_s']:.1f} | "
            f"{run['finetune_process_cpu_s']:.1f} | {run['load_1min_before']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def default_name() -> str:
    """hotpath-CPU-DATE, the CPU's model name in lower case with dashes (e.g. hotpath-amd-epyc-2026-12-04)."""
    cpu = "-".join(cpu_name().lower().replace("(r)", "").replace("(tm)", "").split()) or "cpu"
    return f"hotpath-{cpu}-{time.strftime('%Y-%m-%d')}"


def main() -> None:
    args_parser = parser(__doc__, quick=True)
    args_parser.add_argument("--old", type=Path, help="the src folder of the code before")
    args_parser.add_argument("--new", type=Path, help="the src folder of the code after")
    args_parser.add_argument("--old-label", default="", help="what OLD is, e.g. a commit (default: its path)")
    args_parser.add_argument("--new-label", default="", help="what NEW is (default: its path)")
    args_parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs both copies once")
    args_parser.add_argument("--name", default=None, help="results name (default hotpath-CPU-DATE)")
    args_parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for both runs (default: transferkit's own choice)"
    )
    args_parser.add_argument(
        "--context", default=None, help="a note on the conditions, shown under the table (e.g. other load)"
    )
    args_parser.add_argument(
        "--rewrite", action="store_true", help="measure nothing: rewrite OUT/NAME.md from NAME.json (with --context)"
    )
    args = args_parser.parse_args()
    name = args.name or default_name()
    if args.rewrite:
        result = read_results(name, args.out)
        result["context"] = args.context or result.get("context")
        write_results(name, result, markdown(result), args.out)
        return print(markdown(result))
    if args.old is None or args.new is None:
        args_parser.error("--old and --new are needed to measure")
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    result = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "quick": args.quick,
        "note": (
            "B1: transferkit's side of bench.py's B1 (linear probe, 10 epochs, 96 px, whole process, "
            "cold caches), wall seconds. Fine-tune: bench.py's B2 run as a command (full, 2 epochs, 96 px, "
            "lr 1e-4), img/s of the last epoch. Rounds alternate which copy runs first."
        ),
        "context": args.context,
        "threads": args.threads,
        "runs": [],
    }
    result["machine_line"] = machine_line(result["machine"])
    for side, src in sides.items():
        label = getattr(args, f"{side}_label") or str(src)
        result[side] = {"src": str(src), "label": label, "imports": imported_from(src)}
    work = Path(tempfile.mkdtemp(prefix="transferkit-hotpath-"))
    try:
        folders = {"b1": b1_folder(work, args.quick)[0], "b2": b2_folder(work, args.quick)[0]}
        for round_no in range(args.repeats):
            order = ("old", "new") if round_no % 2 == 0 else ("new", "old")
            for side in order:
                run = one_side(side, sides[side], round_no, folders, work, args.threads)
                result["runs"].append(run)
                result["summary"] = summary(result["runs"])
                write_results(name, result, markdown(result), args.out)  # each run kept as it comes
                print(
                    f"[hotpath] round {round_no} {side}: B1 {run['b1_seconds']:.2f} s, fine-tune "
                    f"{run['finetune_images_per_s']:.1f} img/s (load {run['load_1min_before']:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
