"""Bad input data: the scan, skipped.txt, the --bad-files policy, and every image mode decoded right."""

import resource
import shutil
import struct
import zlib

import numpy as np
import pytest
from conftest import make_folder
from PIL import Image
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.core.errors import UserError
from transferkit.data.check import inspect_file
from transferkit.data.images import open_image
from transferkit.data.sources import load_data


def _gradient(w: int, h: int) -> Image.Image:
    """A smooth, asymmetric RGB image: any wrong rotation or flip changes it a lot."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    return Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8))


def _bomb_png(path, side: int = 60_000) -> None:
    """A valid PNG header declaring side x side pixels (3.6 G), with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def messy_dir(tmp_path):
    """Shapes plus every kind of bad file and every awkward image mode, in the class folders."""
    root = make_folder(tmp_path / "messy", per_class=10)
    circle, square = root / "circle", root / "square"
    jpeg = circle / "good.jpg"
    _gradient(48, 32).save(jpeg, quality=95)
    data = jpeg.read_bytes()
    (circle / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (circle / "empty.jpg").write_bytes(b"")
    (square / "notes.png").write_text("this is not an image\n")
    (square / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "triangle").mkdir()
    _gradient(48, 32).convert("CMYK").save(circle / "cmyk.jpg", quality=95)
    Image.fromarray((np.linspace(0, 65535, 48 * 32).reshape(32, 48)).astype(np.uint16)).save(square / "deep.png")
    rgba = _gradient(48, 32).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(square / "alpha.png")
    upright = _gradient(48, 32)
    upright.save(circle / "upright.jpg", quality=100, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    upright.transpose(Image.Transpose.ROTATE_90).save(circle / "rotated.jpg", quality=100, subsampling=0, exif=exif)
    return root


BAD = {
    "circle/truncated.jpg": "truncated",
    "circle/empty.jpg": "empty file",
    "square/notes.png": "not an image",
    "square/.DS_Store": "hidden file",
    "triangle": "empty class folder",
}


def test_train_completes_and_skipped_txt_lists_exactly_the_bad_files(messy_dir, tiny):
    run = transferkit.train(data=str(messy_dir), strategy="linear-probe", **tiny)
    lines = [line.split("\t") for line in (run.dir / "skipped.txt").read_text().splitlines()]
    listed = {str(__import__("pathlib").Path(p).relative_to(messy_dir.resolve())): r for p, r in lines}
    assert listed.keys() == BAD.keys()
    for path, reason in BAD.items():
        assert listed[path].startswith(reason), (path, listed[path])
    used = {ref for split in load_data(str(messy_dir)).splits.values() for ref, _ in split}
    for name in ("circle/cmyk.jpg", "square/deep.png", "square/alpha.png", "circle/rotated.jpg"):
        assert str((messy_dir / name).resolve()) in used
    assert run.metrics["skipped_files"] == len(BAD)


def test_bad_files_error_policy_refuses_with_the_list(messy_dir, tiny):
    with pytest.raises(UserError, match=r"(?s)4 file\(s\) of .* cannot be used:\n.*empty.jpg: empty file"):
        transferkit.train(data=str(messy_dir), bad_files="error", **tiny)


def test_exif_rotation_is_applied(messy_dir):
    rotated = np.asarray(open_image(messy_dir / "circle" / "rotated.jpg"), dtype=np.int16)
    upright = np.asarray(open_image(messy_dir / "circle" / "upright.jpg"), dtype=np.int16)
    assert rotated.shape == upright.shape == (32, 48, 3)
    assert np.abs(rotated - upright).max() <= 3  # JPEG rounding only
    assert np.abs(np.rot90(rotated, 2) - upright).mean() > 40  # a wrong orientation would differ a lot


def test_16_bit_images_are_scaled_not_clipped(messy_dir):
    pixels = np.asarray(open_image(messy_dir / "square" / "deep.png"), dtype=np.int16)[..., 0]
    assert pixels.min() == 0
    assert pixels.max() == 255  # the full range survives
    assert len(np.unique(pixels)) > 200  # a ramp, not a saturated block
    expected = np.round(np.linspace(0, 65535, 48 * 32).reshape(32, 48) / 65535 * 255)
    assert np.abs(pixels - expected).max() <= 1


def test_cmyk_and_alpha_become_plain_rgb(messy_dir):
    reference = np.asarray(_gradient(48, 32), dtype=np.int16)
    cmyk = open_image(messy_dir / "circle" / "cmyk.jpg")
    assert cmyk.mode == "RGB"
    assert np.abs(np.asarray(cmyk, dtype=np.int16) - reference).mean() < 6
    alpha = open_image(messy_dir / "square" / "alpha.png")
    # half-transparent on white: halfway between the colour and 255
    assert alpha.mode == "RGB"
    assert np.abs(np.asarray(alpha, dtype=np.int16) - (reference + 255) / 2).max() <= 2
    assert open_image(messy_dir / "square" / "alpha.png", in_chans=1).mode == "L"


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    _bomb_png(bomb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reason = inspect_file(bomb)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert reason.startswith("decompression bomb refused")
    assert grown_mb < 100  # decoding would need 3.6 GB


def test_duplicate_content_across_splits_is_leakage_and_leaves_val_test(tmp_path):
    root = make_folder(tmp_path / "split", per_class=4, splits=("train", "val", "test"))
    shutil.copy(root / "train" / "circle" / "0.png", root / "test" / "circle" / "copy.png")
    data = load_data(str(root))
    assert str((root / "test" / "circle" / "copy.png").resolve()) not in {r for r, _ in data.splits["test"]}
    ((path, reason),) = data.skipped
    assert path.endswith("test/circle/copy.png")
    assert "leakage into test" in reason
    assert "train/circle/0.png" in reason


def test_check_command_lists_problems_and_exits_1(messy_dir, tmp_path):
    out = CliRunner().invoke(app, ["check", str(messy_dir)])
    assert out.exit_code == 1, out.output
    assert "truncated.jpg" in out.output
    assert "usable:" in out.output
    clean = make_folder(tmp_path / "clean", per_class=10)
    out = CliRunner().invoke(app, ["check", str(clean)])
    assert out.exit_code == 0, out.output
    assert "0 file(s) left out" not in out.output
    assert "usable: train 16, val 2, test 2" in out.output


def test_a_one_image_class_is_named_and_macro_f1_covers_the_classes_present(tmp_path, tiny, capsys):
    root = make_folder(tmp_path / "odd", per_class=10)
    (root / "triangle").mkdir()
    shutil.copy(root / "circle" / "0.png", root / "triangle" / "0.png")
    run = transferkit.train(data=str(root), strategy="linear-probe", name="odd", **tiny)
    said = capsys.readouterr().err
    assert (
        "warning: class 'triangle' has 1 image, too few for every split: none in val and test "
        "(not validated and not scored)" in said
    ), said
    test = run.metrics["test"]
    assert test["absent"] == ["triangle"]
    assert set(test["per_class"]) == {"circle", "square"}
    assert test["macro_f1"] == pytest.approx(np.mean([m["f1"] for m in test["per_class"].values()]))
    assert "(no test images for triangle)" in said


def test_links_are_named_by_their_own_path_and_links_out_of_the_folder_are_listed_or_refused(tmp_path):
    root = make_folder(tmp_path / "linked", per_class=10)
    outside = tmp_path / "elsewhere.png"
    shutil.copy(root / "circle" / "0.png", outside)
    (root / "circle" / "link.png").symlink_to(outside)
    (root / "square" / "inside.png").symlink_to(root / "square" / "0.png")  # inside the folder: nothing to say
    followed = load_data(str(root))
    link = str(root / "circle" / "link.png")
    assert followed.outside_links == [(link, str(outside))]
    refs = {ref for split in followed.splits.values() for ref, _ in split}
    assert link in refs
    assert str(outside) not in refs
    out = CliRunner().invoke(app, ["check", str(root)])
    assert (
        f"link outside the folder (followed; --outside-links refuse leaves it out): {link} -> {outside}" in out.output
    ), out.output
    refused = load_data(str(root), outside_links="refuse")
    assert link not in {ref for split in refused.splits.values() for ref, _ in split}
    assert [(p, r) for p, r in refused.skipped if p == link] == [
        (link, f"link to '{outside}', outside the data folder (--outside-links refuse)")
    ]
