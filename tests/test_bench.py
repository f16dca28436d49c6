"""The benchmark harness runs end to end (tiny sizes; speed is measured by `make bench`, never here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def harness(monkeypatch):
    """benchmarks/harness.py as a module (the scripts import it from their own folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import harness

    return harness


def test_results_live_apart_from_the_code(harness):
    assert harness.RESULTS == BENCHMARKS / "results"
    assert not list(BENCHMARKS.glob("*.json")) and not list(BENCHMARKS.glob("*.md"))
    assert (BENCHMARKS / "results" / "bench.json").is_file()
    assert harness.parser(__doc__).parse_args([]).out == BENCHMARKS / "results"


def test_write_results_writes_json_and_markdown_whole(harness, tmp_path):
    out = tmp_path / "new"
    paths = harness.write_results("case", {"rows": [1, 2]}, "| a |\n|---|", out)
    assert paths == (out / "case.json", out / "case.md")
    assert json.loads((out / "case.json").read_text()) == {"rows": [1, 2]}
    assert (out / "case.md").read_text() == "| a |\n|---|\n"
    harness.write_results("case", {"rows": [3]}, "b", out)  # replaces, leaves no partial file behind
    assert harness.read_results("case", out) == {"rows": [3]}
    assert sorted(p.name for p in out.iterdir()) == ["case.json", "case.md"]
    assert harness.read_results("missing", out) is None


def test_machine_names_the_cpu_and_torch(harness):
    where = harness.machine()
    assert where["cpu"] and where["cores"] >= 1 and where["torch"]
    assert all(flag.startswith(("avx", "amx")) for flag in where["cpu_flags"])
    assert where["cpu"] in harness.machine_line(where)


@pytest.mark.slow
def test_bench_quick_writes_json_and_markdown(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["case"] for r in results] == ["B1", "B2", "B3", "B4", "B5", "B6"]
    assert all(r["ratio"] > 0 for r in results)
    assert "| B1 |" in (tmp_path / "bench.md").read_text()
