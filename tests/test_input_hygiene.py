"""Issue 17 (predict input hygiene, rest): a pixel limit read from the header, EXIF orientation applied by the one
image reader (training and predict), one 16-bit rule, symlinked sub-folders. Through the real CLI where it is
about predict."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from anomaly_core.cli import app
from anomaly_core.data.images import load_image
from anomaly_core.errors import DataError
from test_trust_io import _images, tiny  # noqa: F401 - the module-scoped tiny kNN bundle


def _predict(bundle: Path, files: list, out: Path, cat: str, *extra: str):
    res = CliRunner().invoke(app, ["predict", str(bundle), *map(str, files), "--out", str(out), "--category", cat,
                                   *extra])
    table = list(csv.DictReader(open(out / "predictions.csv"))) if (out / "predictions.csv").exists() else []
    return res, table


def test_pixel_limit_is_read_from_the_header_before_decoding(tmp_path):
    """On main there was no limit (Pillow only warns below 179 MP)."""
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((60, 50, 3), np.uint8)).save(path)
    assert load_image(path, max_pixels=3000).shape == (60, 50, 3)
    with pytest.raises(DataError, match=r"big.png is 50x60 \(WxH\) = 3,000 pixels, above the limit of 2,999"):
        load_image(path, max_pixels=2999)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: decoding would fail, the header check comes first
    with pytest.raises(DataError, match="above the limit"):
        load_image(path, max_pixels=2999)


def test_predict_max_pixels_refuses_one_image_and_scores_the_others(tiny, tmp_path):  # noqa: F811
    root, rows, bundle = tiny
    cat, images = _images(rows, root)
    big = tmp_path / "big.png"
    w, h = Image.open(images[0]).size
    Image.open(images[0]).convert("RGB").resize((w * 2, h * 2)).save(big)
    res, table = _predict(bundle, [big, images[0]], tmp_path / "o", cat, "--max-pixels", str(w * h * 2))
    assert res.exit_code == 0, res.output
    assert f"big.png is {2 * w}x{2 * h} (WxH)" in table[0]["error"] and table[0]["score"] == ""
    assert table[1]["error"] == "" and float(table[1]["score"]) > 0
    res, _ = _predict(bundle, [images[0]], tmp_path / "o2", cat, "--max-pixels", "0")
    assert res.exit_code != 0 and "--max-pixels 0" in res.output


def test_exif_orientation_is_applied_in_predict(tiny, tmp_path):  # noqa: F811
    """On main a phone photo tagged 'rotate 90' was scored as stored (sideways)."""
    root, rows, bundle = tiny
    cat, images = _images(rows, root)
    src = np.asarray(Image.open(images[1]).convert("RGB"))
    src = np.ascontiguousarray(src[:, : src.shape[1] * 3 // 4])  # not square: a rotation changes the shape
    tagged = tmp_path / "tagged.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(src).save(tagged, quality=95, exif=exif)
    with Image.open(tagged) as im:  # the stored pixels, orientation not applied
        stored = np.asarray(im.convert("RGB"))
    upright = tmp_path / "upright.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(upright)  # physically rotated CW
    assert load_image(tagged).shape == load_image(upright).shape == (stored.shape[1], stored.shape[0], 3)
    np.testing.assert_array_equal(load_image(tagged), load_image(upright))
    from anomaly_core.data.images import image_size
    assert image_size(tagged) == image_size(upright)  # the header size agrees with the decoded array
    res, table = _predict(bundle, [tagged, upright, images[1]], tmp_path / "o", cat)
    assert res.exit_code == 0, res.output
    assert table[0]["score"] == table[1]["score"] != ""
    untagged = tmp_path / "stored.png"
    Image.fromarray(stored).save(untagged)
    _, t2 = _predict(bundle, [untagged], tmp_path / "o2", cat)
    assert t2[0]["score"] != table[0]["score"]  # the tag really changes what is scored


def test_one_16_bit_rule_divides_by_65535(tmp_path):
    """On main a 16-bit image whose maximum was <= 255 was read as 8-bit values (255x brighter than its twin)."""
    values = np.array([[0, 257, 1000], [200, 32768, 65535]], dtype=np.uint16)
    expected = np.clip((values.astype(np.int64) * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
    bright, dark = tmp_path / "bright.png", tmp_path / "dark.png"
    Image.fromarray(values).save(bright)
    Image.fromarray(np.minimum(values, 200)).save(dark)  # same pixels where < 200, max 200
    assert Image.open(bright).mode.startswith("I")
    got = load_image(bright)
    np.testing.assert_array_equal(got[:, :, 0], expected)
    np.testing.assert_array_equal(got[:, :, 0], got[:, :, 2])
    d = load_image(dark)[:, :, 0]
    assert d[0, 0] == 0 and d[1, 0] == expected[1, 0] == 1  # 200/65535*255 -> 1, as in the bright image


def test_symlinked_sub_folders_are_followed_by_predict_and_the_readers_alike(tmp_path):
    """On main `expand_inputs` (rglob) silently skipped a symlinked sub-folder that the dataset readers follow."""
    from anomaly_core.data.readers import _list_images, _subdirs  # the dataset readers' folder listings
    from anomaly_core.deploy.predict import expand_inputs

    real = tmp_path / "elsewhere" / "batch2"
    real.mkdir(parents=True)
    top = tmp_path / "inputs"
    (top / "batch1").mkdir(parents=True)
    for d, n in ((top / "batch1", "a.png"), (real, "b.png")):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / n)
    (top / "batch2").symlink_to(real, target_is_directory=True)
    (top / "batch1" / "c.png").symlink_to(real / "b.png")
    got = [p.relative_to(top).as_posix() for p in expand_inputs([top])]
    assert got == ["batch1/a.png", "batch1/c.png", "batch2/b.png"]
    assert [p.name for p in _subdirs(top)] == ["batch1", "batch2"]  # the readers follow the same links
    assert [p.name for p in _list_images(top / "batch2")] == ["b.png"]
    assert [p.name for p in _list_images(top / "batch1")] == ["a.png", "c.png"]
    (top / "batch1" / "loop").symlink_to(top, target_is_directory=True)
    with pytest.raises(DataError, match="symlink loop"):
        expand_inputs([top])
