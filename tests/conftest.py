"""Shared fixtures: small PIL-drawn image folders, so tests never need downloads."""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

SHAPES = ("circle", "square")


def draw_shape(shape: str, size: int, rng: random.Random) -> Image.Image:
    """A light shape of random size, position and colour on a dark noisy background."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 60) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    color = tuple(rng.randint(150, 255) for _ in range(3))
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return img


def make_folder(root: Path, per_class: int, size: int = 40, seed: int = 0, splits: tuple[str, ...] = ()) -> Path:
    """root/[split/]class/N.png for every shape class."""
    rng = random.Random(seed)
    for split in splits or ("",):
        for shape in SHAPES:
            out = root / split / shape
            out.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw_shape(shape, size, rng).save(out / f"{i}.png")
    return root


def needs(*modules: str) -> pytest.MarkDecorator:
    """Marks a test that needs optional packages. `make test` installs them all, so a missing one fails the
    test, unless TRANSFERKIT_TEST_SKIP_MISSING=1 (a lent GPU machine, where only carried wheels install)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(
        bool(missing) and os.environ.get("TRANSFERKIT_TEST_SKIP_MISSING") == "1",
        reason=f"needs {', '.join(missing)}, not installed here",
    )


def in_ci() -> bool:
    """Whether this is a CI run (`CI=true`, as `.ci/run`'s callers and the common CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def need(condition: bool, reason: str) -> None:
    """Inside a test or fixture: go on only if `condition` holds. Where it does not, the test skips with `reason`
    (shown by `make test`, which runs pytest with -rs), except in CI (`CI=true`): there the missing piece is
    one `.ci/run` is meant to provide (PostgreSQL's initdb, the fortunes package, Chromium, root and
    unshare), so its absence is a broken CI machine and fails the test instead of hiding it in a skip count."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true, and this test cannot run: {reason}", pytrace=False)
    # reported at the test's line (what pytest.mark.skipif does), not at this helper's
    raise pytest.skip.Exception(reason, _use_item_location=True)


def pytest_runtest_logreport(report):
    """TRANSFERKIT_TEST_FAILURES=FILE: each failure's traceback is appended to FILE when it happens, so a
    run cut off by a time limit (a lent GPU machine's call) still tells what failed and why."""
    path = os.environ.get("TRANSFERKIT_TEST_FAILURES")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # xdist: the controller writes
        with open(path, "a") as out:
            out.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


def _share_the_cores_among_xdist_workers() -> None:
    """`pytest -n N`: each worker runs on its own Nth of the cores, so the torch threads and loader workers
    that transferkit sizes from the machine (its CPU affinity) do not oversubscribe it N times over."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cores, i, n = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    share = cores[i * len(cores) // n : (i + 1) * len(cores) // n] or [cores[i % len(cores)]]
    os.sched_setaffinity(0, share)
    # OpenMP sizes its pool when torch loads, from the cores it sees then; the likely cause of a lite0 forward
    # at 32 px outlasting a 240 s timeout in a 2-core worker on a 16-core GPU machine, when this came later
    os.environ["OMP_NUM_THREADS"] = str(len(share))


_share_the_cores_among_xdist_workers()  # before anything imports torch


@pytest.fixture(autouse=True, scope="module")
def cpu_unless_marked_cuda(request):
    """The suite's tests are CPU tests (their tolerances are fp32 on a CPU); modules marked `cuda` are the GPU's.
    On a machine with a GPU, `device auto` in an unmarked module, its module fixtures included, and in the
    processes they start, finds none."""
    import torch

    if request.node.get_closest_marker("cuda") or not torch.cuda.is_available():
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(autouse=True, scope="session")
def feature_cache_in_tmp(tmp_path_factory):
    """Cached features go to a folder of this test session, never to ~/.cache."""
    os.environ["TRANSFERKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def simulated_bf16_cpu():
    """TRANSFERKIT_TEST_BF16_FASTER=1 (`make test-bf16`): act as a CPU with native bf16 that times bf16 3x
    faster than fp32 for every model and kind of work, so precision auto picks bf16 wherever it may: the
    suite's numerics at their worst, on any CPU (bf16 autocast is emulated where not native). Processes the
    tests start (CLI, torchrun) see TRANSFERKIT_CPU_BF16=1 and time the real thing."""
    if os.environ.get("TRANSFERKIT_TEST_BF16_FASTER") != "1":
        yield
        return
    from transferkit.models import precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERKIT_CPU_BF16", "1")
        patch.setattr(precision, "measure", lambda workload, kind: {"fp32": 100.0, "bf16": 300.0})
        yield


@pytest.fixture
def shapes_dir(tmp_path: Path) -> Path:
    """Flat class folders: 10 circles and 10 squares, 40x40 px."""
    return make_folder(tmp_path / "shapes", per_class=10)


@pytest.fixture
def faces_dir(tmp_path: Path) -> Path:
    """The demo job's data (builtin:faces, 25x25 grayscale) as PNG files in split/class folders: runs on it
    read the decoded-image cache, which the in-memory builtin never does."""
    from transferkit.data import builtin

    arrays, splits = builtin.load("faces")
    for split, items in splits.items():
        for ref, label in items:
            out = tmp_path / "faces" / split / label
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arrays[ref]).save(out / f"{ref.replace('/', '_')}.png")
    return tmp_path / "faces"


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    """Config overrides for fast CPU runs: 32 px, lite0, 1 epoch, runs under tmp_path."""
    return {
        "img_size": 32,
        "epochs": 1,
        "batch_size": 8,
        "runs_dir": str(tmp_path / "runs"),
        "quiet": True,
        "workers": 0,
        "html_report": False,
    }


TOPICS = {
    "cooking": (
        "Stir the onions in butter until they turn golden.",
        "Bake the bread for forty minutes in a hot oven.",
        "Add a pinch of salt to the boiling pasta water.",
        "Whisk the eggs with sugar until the batter is pale.",
        "Simmer the tomato sauce with garlic and basil.",
        "Roast the chicken with lemon, thyme and potatoes.",
        "Knead the dough and let it rise for an hour.",
        "Chop the carrots and celery for the soup.",
        "Season the steak with pepper before grilling it.",
        "Melt the chocolate slowly over a pot of warm water.",
        "Fry the rice with soy sauce and spring onions.",
        "Peel the apples and slice them for the pie.",
        "Grate the cheese over the hot lasagna.",
        "Marinate the fish in lime juice and chili.",
        "Serve the stew with fresh bread and a green salad.",
        "Boil the potatoes, then mash them with milk.",
        "Toast the spices in a dry pan before the curry.",
        "Cream the butter and flour for a cake.",
        "The recipe needs two cups of flour and an egg.",
        "Taste the soup and add more salt if it is bland.",
    ),
    "computers": (
        "The compiler reports a syntax error on line ten.",
        "Reboot the server after installing the kernel update.",
        "The program crashed with a segmentation fault.",
        "Save the file before the laptop battery runs out.",
        "The database query returns too many rows.",
        "Install the package with the command line tool.",
        "The network card drops packets under heavy load.",
        "Debug the function that leaks memory.",
        "The keyboard and the mouse connect over USB.",
        "Copy the source code into a new git branch.",
        "The processor overheats when the fan stops.",
        "Format the disk and reinstall the operating system.",
        "The browser cache fills the hard drive.",
        "Write a unit test for the sorting algorithm.",
        "The password manager encrypts every login.",
        "Update the graphics driver to fix the screen flicker.",
        "The script parses the log files every night.",
        "A software bug corrupted the backup archive.",
        "Compile the kernel module against the new headers.",
        "The router assigns an IP address to each computer.",
    ),
    "sports": (
        "The striker scored twice in the second half.",
        "The runner finished the marathon in record time.",
        "Our team won the basketball game in overtime.",
        "The goalkeeper saved a penalty in the final minute.",
        "She swam four laps of the pool before breakfast.",
        "The tennis match went to a fifth set.",
        "The cyclists climbed the mountain stage in the rain.",
        "The coach picked a new captain for the season.",
        "He hit a home run in the ninth inning.",
        "The referee showed the defender a red card.",
        "The boxer won the title fight on points.",
        "The relay team dropped the baton on the last leg.",
        "Fans cheered as the skier crossed the finish line.",
        "The rugby players trained on the muddy field.",
        "The golfer sank a long putt on the final hole.",
        "The league table shows the champions far ahead.",
        "The sprinter false-started and was disqualified.",
        "The volleyball team served an ace to win the set.",
        "The hockey player scored on a fast breakaway.",
        "The champion lifted the trophy after the match.",
    ),
}
"""Three clearly different topics, 20 short sentences each: the first 12 of a topic train, 3 validate, 5 test."""
TOPIC_SPLIT = {"train": range(12), "val": range(12, 15), "test": range(15, 20)}


def write_topics(path: Path) -> Path:
    """TOPICS as a text CSV (text,label,split) at `path`: a text dataset that needs no package beyond the suite's."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        table = csv.writer(fh)
        table.writerow(["text", "label", "split"])
        for label, texts in TOPICS.items():
            for split, rows in TOPIC_SPLIT.items():
                table.writerows([texts[i], label, split] for i in rows)
    return path


@pytest.fixture
def topics_csv(tmp_path: Path) -> Path:
    """The TOPICS text dataset (60 sentences of cooking, computers, sports; 36/9/15 train/val/test) as a CSV."""
    return write_topics(tmp_path / "topics.csv")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this test module: its SQLAlchemy URL."""
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    need(initdb is not None, "PostgreSQL is not installed here (`.ci/run` installs it from Debian's packages)")
    bin_dir = Path(initdb).resolve().parent  # the server's own tools, not a distribution wrapper
    root = Path(tempfile.mkdtemp(prefix="tk-pg-"))
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the packages' postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(*args):
        done = subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]}: {done.stderr}"

    pg(bin_dir / "initdb", "-D", root / "data", "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg(
        bin_dir / "pg_ctl",
        "-D",
        root / "data",
        "-l",
        root / "log",
        "-w",
        "-o",
        f"-p {port} -k {root} -h 127.0.0.1",
        "start",
    )
    try:
        pg(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "tune")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/tune"
    finally:
        pg(bin_dir / "pg_ctl", "-D", root / "data", "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A linear probe at 32 px on 4 circles and 4 squares (train/ and test/ folders), one per test module, under a
    short path."""
    import transferkit

    root = tmp_path_factory.mktemp("probe")
    data = make_folder(root / "shapes", per_class=4, size=32, splits=("train", "test"))
    run = transferkit.train(
        data=str(data),
        strategy="linear-probe",
        img_size=32,
        epochs=1,
        precision="fp32",
        runs_dir=str(root / "runs"),
        name="probe",
        quiet=True,
        workers=0,
        html_report=False,
    )
    return Path(run.dir)
