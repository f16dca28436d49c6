"""Every file a run, an export and a study write goes through the atomic writer (`transferkit.core.files`): the
file opened for writing is the writer's temp file (`.NAME.tmp`, or a file inside a `.FOLDER.tmp` folder), renamed
over the target once complete. A plain write in place (`open(path, "w")`, `Path.write_text`, `torch.save(path)`)
in the run folder is one a crash or a full disk can leave torn; this test enumerates the writers and fails on one.

The exception by design: metrics.jsonl, appended one row per epoch (a crash loses at most the row being written,
and `--resume` rewrites the file from the checkpoint's epoch through the atomic writer)."""

import builtins
import contextlib
import io
import os
import re
from pathlib import Path

import pytest

import transferkit

APPENDED = {("metrics.jsonl", "a")}
"""(file name, mode) of the plain writes allowed by design."""


WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
TEMP = re.compile(r"^\..+\.tmp$")  # core.files.atomic_write's temp file, and aside(directory, "tmp")'s folder


def _atomic_temp(path: Path, root: Path) -> bool:
    return any(TEMP.match(part) for part in path.relative_to(root).parts)


@contextlib.contextmanager
def writes_under(root: Path):
    """Record (path relative to `root`, mode) of each file under `root` opened for writing other than by the atomic
    writer: through open (builtins and io, so Path.open/write_text too), os.open, and the two writers that open
    their file outside Python (torch.save to a path, safetensors' save_file)."""
    import safetensors.torch
    import torch

    root = root.absolute()
    found: list[tuple[str, str]] = []

    def note(file, mode: str) -> None:
        if isinstance(file, int) or not isinstance(file, (str, bytes, os.PathLike)):
            return  # a file descriptor or a buffer: its file was opened, and noted, before
        path = Path(os.fsdecode(file)).absolute()
        if root in path.parents and not _atomic_temp(path, root):
            found.append((str(path.relative_to(root)), mode))

    real_open, real_os_open = builtins.open, os.open
    real_save, real_save_file = torch.save, safetensors.torch.save_file

    def spy_open(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            note(file, mode.replace("b", "").replace("t", ""))
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(path, flags, *args, **kwargs):
        if flags & WRITING:
            note(path, "os.open")
        return real_os_open(path, flags, *args, **kwargs)

    def spy_save(obj, f, *args, **kwargs):
        note(f, "torch.save")
        return real_save(obj, f, *args, **kwargs)

    def spy_save_file(tensors, filename, *args, **kwargs):
        note(filename, "save_file")
        return real_save_file(tensors, filename, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", spy_open)
        patch.setattr(io, "open", spy_open)  # pathlib.Path.open calls io.open
        patch.setattr(os, "open", spy_os_open)
        patch.setattr(torch, "save", spy_save)
        patch.setattr(safetensors.torch, "save_file", spy_save_file)
        yield found


def _plain(found: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (file name, mode) pairs of the plain writes found."""
    return {(Path(path).name, mode) for path, mode in found}


def test_the_spy_sees_a_plain_write_and_lets_the_atomic_writer_through(tmp_path):
    from transferkit.core.files import atomic_write, write_text

    with writes_under(tmp_path) as found:
        (tmp_path / "plain.json").write_text("{}")
        with open(tmp_path / "plain.csv", "a") as fh:
            fh.write("1\n")
        write_text(tmp_path / "safe.json", "{}")
        (tmp_path / "folder").mkdir()
        atomic_write(tmp_path / "folder" / "safe.bin", lambda tmp: Path(tmp).write_bytes(b"1"))
        assert (tmp_path / "plain.json").read_text() == "{}"  # a read is not a write
    assert found == [("plain.json", "w"), ("plain.csv", "a")]
    assert (tmp_path / "safe.json").read_text() == "{}"


def test_a_run_its_report_and_its_export_write_through_the_atomic_writer(shapes_dir, tiny, tmp_path):
    """A 2-epoch run with its HTML report, then an ONNX export of it."""
    from transferkit.deploy.export import export

    runs = Path(tiny["runs_dir"])
    with writes_under(runs) as found:
        run = transferkit.train(
            data=str(shapes_dir), **{**tiny, "epochs": 2, "html_report": True, "strategy": "linear-probe"}
        )
        export(run.dir)
    assert (run.dir / "report.html").is_file()
    assert (run.dir / "export" / "model.json").is_file()
    assert _plain(found) == APPENDED, found
    assert [m for p, m in found if Path(p).name == "metrics.jsonl"] == ["a", "a"]  # one append an epoch


def test_a_study_and_its_rank_write_through_the_atomic_writer(tiny, tmp_path):
    """Two trials of two epochs on builtin:faces, with a LogME rank of one backbone first: rank.json, the trials'
    runs, study.json, best.json, best.yaml, the study's report and plots."""
    runs = Path(tiny["runs_dir"])
    with writes_under(runs) as found:
        summary = transferkit.tune(
            data="builtin:faces",
            trials=2,
            pruner="none",
            models=["efficientnet_lite0"],
            top_k=1,
            name="study",
            epochs=2,  # the space's lp-ft needs two
            **{key: tiny[key] for key in ("img_size", "batch_size", "runs_dir")},
        )
    folder = runs / "study"
    assert summary["finished"] == 2
    for name in ("rank.json", "study.json", "best.json", "best.yaml", "report.html"):
        assert (folder / name).is_file(), name
    assert _plain(found) <= APPENDED, found
    assert ("metrics.jsonl", "a") in _plain(found)  # the trials' runs were watched
