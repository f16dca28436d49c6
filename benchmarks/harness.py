"""What every benchmark script shares: its command-line basics, the machine it ran on, and where its results go.

A script parses with `parser(__doc__)` (adding its own options), names the machine with `machine()`
(a dict for the JSON) or `machine_line()` (one line for the markdown), and ends with
`write_results(NAME, result, table_md, args.out)`, which writes OUT/NAME.json and OUT/NAME.md.
OUT defaults to benchmarks/results/: measured figures live there, apart from the code that made them.
Both files are written to a temporary name first and then renamed, so a benchmark killed while writing
leaves the previous figures whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CPU_FLAG_PREFIXES = ("avx", "amx")  # the vector and matrix units that decide which kernels torch runs


def parser(doc: str | None, *, quick: bool = False) -> argparse.ArgumentParser:
    """A parser described by the script's docstring, with --out (default benchmarks/results/) and,
    where the script has tiny sizes for checking itself, --quick."""
    description = None
    if doc:
        description = doc.strip().splitlines()[0]
    parsed = argparse.ArgumentParser(description=description)
    parsed.add_argument(
        "--out", type=Path, default=RESULTS, help=f"folder for the NAME.json and NAME.md results (default {RESULTS})"
    )
    if quick:
        parsed.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the figures")
    return parsed


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> list[str]:
    """The CPU's AVX and AMX flags, sorted (empty where /proc/cpuinfo is missing)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    return sorted({flag for flag in cpuinfo.read_text().split() if flag.startswith(CPU_FLAG_PREFIXES)})


def machine() -> dict:
    """The machine a benchmark ran on: CPU model, its AVX/AMX flags, cores, GPU, torch and Python versions,
    and the date. Imports torch (call it after the timing, or where torch is loaded anyway)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def machine_line(where: dict | None = None) -> str:
    """`machine()` as one line for a markdown heading: CPU, cores, flags, GPU, torch."""
    where = where or machine()
    flags = " ".join(where["cpu_flags"]) or "no AVX"
    gpu = where["gpu"] or "no GPU"
    return f"{where['cpu']}, {where['cores']} cores ({flags}), {gpu}, torch {where['torch']}"


def read_results(name: str, out: Path = RESULTS) -> dict | None:
    """OUT/NAME.json as written before, or None where there is none."""
    path = Path(out) / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_results(name: str, result: dict | list, table_md: str, out: Path = RESULTS) -> tuple[Path, Path]:
    """Write OUT/NAME.json (the result, indented) and OUT/NAME.md (the table as given, ending in a newline),
    each through a temporary file renamed into place; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    _write_atomically(json_path, json.dumps(result, indent=1) + "\n")
    _write_atomically(md_path, table_md.rstrip("\n") + "\n")
    return json_path, md_path
