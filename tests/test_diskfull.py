"""A full disk, two ways. On a real small filesystem: a tmpfs mounted in a private mount namespace (`unshare -m`, as
root, which CI is); the run directory lives on it, the data, the caches and the reference run do not. And on every
machine, root or not: ENOSPC raised inside the real writer (torch.save's checkpoint, safetensors' bundle) of one
file of a `transferkit train` process, after it wrote half of its temp file, as a filling disk does."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_folder, need
from helpers import assert_same_weights, weights


def _can_mount() -> str | None:
    """Why a private tmpfs cannot be made here, or None."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) to mount a private tmpfs"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare -m cannot mount a tmpfs here: {probe.stderr.decode()[:200]}"


@pytest.fixture(scope="module")
def tmpfs():
    """The real small filesystem's tests go on only where one can be mounted (in CI, always: see conftest.need)."""
    why = _can_mount()
    need(why is None, str(why))


def _train(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "transferkit", "train", *args])


def _in_tmpfs(mount: Path, size: int, steps: list[str]) -> list[subprocess.CompletedProcess]:
    """Mount a tmpfs of `size` bytes at `mount` in a private namespace and run each shell step there; a step may
    grow it (`mount -o remount,size=...`). Returns each step's result (exit code, output); what is left on the
    tmpfs is copied to mount.with_suffix('.left') for the checks."""
    mount.mkdir(parents=True, exist_ok=True)
    left = mount.with_suffix(".left")
    logs = [mount.with_name(f"{mount.name}.step{i}") for i in range(len(steps))]
    script = [f"mount -t tmpfs -o size={size} tmpfs {mount}"]
    script += [f"({step}) > {log}.out 2>&1; echo $? > {log}.rc" for step, log in zip(steps, logs)]
    script += [f"cp -a {mount} {left}"]
    subprocess.run(["unshare", "-m", "sh", "-c", "\n".join(script)], check=True, timeout=600)
    return [
        subprocess.CompletedProcess(step, int(Path(f"{log}.rc").read_text()), Path(f"{log}.out").read_text())
        for step, log in zip(steps, logs)
    ]


def _sizes(run: Path) -> tuple[int, int, int]:
    """(best/ bundle, last.ckpt, everything else) in bytes, of a finished run."""
    best = sum(f.stat().st_size for f in (run / "best").iterdir())
    last = (run / "last.ckpt").stat().st_size
    other = sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) - best - last
    return best, last, other


def _temporary(run: Path) -> list[str]:
    return [str(f) for f in run.rglob("*.tmp")]


def test_disk_full_at_a_later_checkpoint_keeps_the_last_and_resume_finishes_the_same(tmpfs, shapes_dir, tmp_path):
    flags = [
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--strategy",
        "full",
        "--quiet",
        "--no-report",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    reference = subprocess.run(
        shlex.split(_train(str(shapes_dir), "--name", "whole", "--runs-dir", str(tmp_path / "runs"), *flags)),
        capture_output=True,
        text=True,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    best, last, other = _sizes(tmp_path / "runs" / "whole")
    assert best < last  # the checkpoint holds the optimizer's moments too
    # room for epoch 1's best/ and last.ckpt, then epoch 2's best/ (written first), not its last.ckpt
    size = other + best + last + (best + last) // 2
    mount = tmp_path / "small"
    run = mount / "runs" / "cut"
    failed, resumed = _in_tmpfs(
        mount,
        size,
        [
            _train(str(shapes_dir), "--name", "cut", "--runs-dir", str(mount / "runs"), *flags),
            f"mount -o remount,size={4 * size} {mount} && " + _train("--resume", str(run), "--quiet"),
        ],
    )
    assert failed.returncode == 74, failed.stdout[-2000:]
    assert f"The disk is full: writing '{run / 'last.ckpt'}' needed" in failed.stdout
    assert "Traceback" not in failed.stdout
    assert "--resume" in failed.stdout
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    left = mount.with_suffix(".left") / "runs" / "cut"
    assert _temporary(left) == []
    assert_same_weights(weights(tmp_path / "runs" / "whole"), weights(left))


def test_disk_full_at_the_first_bundle_or_at_the_feature_cache(tmpfs, shapes_dir, tmp_path):
    """The first best/ finds the disk full: exit 74, nothing half-written, and the same command with --overwrite
    after space is freed trains the undisturbed run. The feature cache finds it full: kept in memory, same run."""
    flags = [
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--strategy",
        "linear-probe",
        "--quiet",
        "--no-report",
    ]
    reference = subprocess.run(
        shlex.split(
            _train(
                str(shapes_dir),
                "--name",
                "whole",
                *flags,
                "--runs-dir",
                str(tmp_path / "runs"),
                "--cache-dir",
                str(tmp_path / "cache"),
            )
        ),
        capture_output=True,
        text=True,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    whole = weights(tmp_path / "runs" / "whole")

    mount = tmp_path / "small"
    command = _train(
        str(shapes_dir),
        "--name",
        "cut",
        *flags,
        "--runs-dir",
        str(mount / "runs"),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    failed, again = _in_tmpfs(
        mount,
        2 * 2**20,
        [  # 2 MB: the config and split fit, lite0's 13 MB bundle does not
            command,
            f"mount -o remount,size={64 * 2**20} {mount} && {command} --overwrite",
        ],
    )
    assert failed.returncode == 74, failed.stdout[-2000:]
    run = mount / "runs" / "cut"
    assert "warning: this run may write " in failed.stdout
    assert f"to {run} and " in failed.stdout  # told first
    assert f"The disk is full: writing '{run / 'best' / 'model.safetensors'}' needed 1" in failed.stdout
    assert "bytes) were free there" in failed.stdout
    assert "--overwrite" in failed.stdout
    assert "Traceback" not in failed.stdout
    assert again.returncode == 0, again.stdout[-2000:]
    left = mount.with_suffix(".left") / "runs" / "cut"
    assert _temporary(left) == []
    assert_same_weights(whole, weights(left))

    mount = tmp_path / "tiny"
    (kept,) = _in_tmpfs(
        mount,
        16 * 2**10,
        [  # 16 kB: not the 12 x 1280 float32 train features (60 kB)
            _train(
                str(shapes_dir),
                "--name",
                "kept",
                *flags,
                "--runs-dir",
                str(tmp_path / "runs"),
                "--cache-dir",
                str(mount / "cache"),
            ),
        ],
    )
    assert kept.returncode == 0, kept.stdout[-2000:]
    assert f"warning: cannot write the cache file '{mount / 'cache' / 'features'}/" in kept.stdout
    assert "the disk is full: it needs" in kept.stdout
    assert "Traceback" not in kept.stdout
    assert _temporary(mount.with_suffix(".left")) == []
    assert_same_weights(whole, weights(tmp_path / "runs" / "kept"))


FILL_AT = """
import errno, os, sys
from pathlib import Path

from transferkit.core import files

name, nth = sys.argv.pop(1), int(sys.argv.pop(1))
real, seen = files.atomic_write, []


def atomic_write(path, write, *args, **kwargs):
    if Path(path).name == name:
        seen.append(path)
        if len(seen) == nth:
            def filling(tmp):
                write(tmp)  # the real writer; then the disk is full: half its bytes made it
                for file in [tmp] if os.path.isfile(tmp) else Path(tmp).rglob("*"):
                    os.truncate(file, os.path.getsize(file) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            return real(path, filling, *args, **kwargs)
    return real(path, write, *args, **kwargs)


files.atomic_write = atomic_write  # before the modules that import it by name (checkpoint, bundle) load
from transferkit.cli import main

sys.argv[0] = "transferkit"
main()
"""
"""`python -c FILL_AT NAME N ARGS...`: `transferkit ARGS...` in which the Nth atomic write of a file named NAME
finds the disk full inside its writer."""

FLAGS = ["--img-size", "32", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--strategy", "full"]
FLAGS += ["--quiet", "--no-report"]


def _filling(name: str, nth: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", FILL_AT, name, str(nth), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "transferkit", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """(data, cache, the weights of an undisturbed 2-epoch run): what each run cut by a full disk must end at."""
    root = tmp_path_factory.mktemp("fill")
    data, cache = make_folder(root / "shapes", per_class=10), root / "cache"
    done = _run(
        "train", str(data), "--name", "whole", "--runs-dir", str(root / "runs"), "--cache-dir", str(cache), *FLAGS
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return data, cache, weights(root / "runs" / "whole")


def test_enospc_at_the_second_checkpoint_exits_74_names_it_and_resume_finishes_the_same(undisturbed, tmp_path):
    data, cache, whole = undisturbed
    run = tmp_path / "runs" / "cut"
    args = ["train", str(data), "--name", "cut", "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(cache)]
    failed = _filling("last.ckpt", 2, *args, *FLAGS)
    assert failed.returncode == 74, failed.stderr[-2000:]
    assert f"The disk is full: writing '{run / 'last.ckpt'}' needed" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert "--resume" in failed.stderr
    assert _temporary(run) == []
    import torch

    kept = torch.load(run / "last.ckpt", weights_only=True)
    assert kept["epoch"] == 1  # epoch 1's checkpoint, whole: epoch 2's never replaced it
    resumed = _run("train", "--resume", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _temporary(run) == []
    assert_same_weights(whole, weights(run))


def test_enospc_at_the_first_bundle_exits_74_and_the_same_command_with_overwrite_trains_the_run(undisturbed, tmp_path):
    data, cache, whole = undisturbed
    run = tmp_path / "runs" / "cut"
    args = ["train", str(data), "--name", "cut", "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(cache)]
    failed = _filling("model.safetensors", 1, *args, *FLAGS)
    assert failed.returncode == 74, failed.stderr[-2000:]
    assert f"The disk is full: writing '{run / 'best' / 'model.safetensors'}' needed" in failed.stderr
    assert "--overwrite" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert _temporary(run) == []
    assert not (run / "best").exists()  # no half bundle
    assert not (run / ".best.tmp").exists()
    again = _run(*args, *FLAGS, "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_weights(whole, weights(run))
