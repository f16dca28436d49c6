"""The benchmark harness runs end to end (tiny sizes; speed is measured by `make bench`, never here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_quick_writes_json_and_markdown(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--quick", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["case"] for r in results] == ["B1", "B2", "B3", "B4", "B5", "B6"]
    assert all(r["ratio"] > 0 for r in results)
    assert "| B1 |" in (tmp_path / "bench.md").read_text()
