"""Tests for anomaly_core.data: images, demo generator, readers and manifest helpers."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_core.data import demo
from anomaly_core.data.images import image_size, load_image, load_mask
from anomaly_core.data.manifest import (
    COLUMNS,
    Row,
    carve_val,
    categories,
    path_str,
    read_manifest,
    rows_for,
    select_shots,
    split_classification,
    write_manifest,
)
from anomaly_core.data.readers import read_imagefolder, read_mvtec, read_visa, validate_rows
from anomaly_core.errors import ConfigError, DataError

SMALL = dict(n_train=2, n_test_good=1, n_test_defect_per_type=2, size=64)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "mode,ext",
    [("L", "png"), ("RGBA", "png"), ("P", "png"), ("RGB", "jpg"), ("L", "jpg"), ("I;16", "png"), ("LA", "png")],
)
def test_load_image_modes_give_rgb_uint8(tmp_path, mode, ext):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    if mode == "I;16":
        im = Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257))
    elif mode != "RGB":
        im = im.convert(mode)
    path = tmp_path / f"x.{ext}"
    im.save(path)
    arr = load_image(path)
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8
    assert image_size(path) == (20, 30)
    if mode == "I;16":
        np.testing.assert_array_equal(arr[:, :, 1], rgb[:, :, 0])


def test_load_image_rgba_composites_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    arr = load_image(tmp_path / "a.png")
    assert arr[0, 0].tolist() == [200, 200, 200] and arr[1, 1].tolist() == [0, 0, 0]


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"this is not an image at all")
    for path in (bad, tmp_path / "missing.png"):
        with pytest.raises(DataError, match=path.name):
            load_image(path)
        with pytest.raises(DataError, match=path.name):
            image_size(path)


def test_load_mask_binary_and_size_check(tmp_path):
    m = np.zeros((8, 10), np.uint8)
    m[2:4, 3:5] = 1
    Image.fromarray(m).save(tmp_path / "m_mask.png")
    mask = load_mask(tmp_path / "m_mask.png", (8, 10))
    assert mask.dtype == bool and mask.sum() == 4
    with pytest.raises(DataError, match="m_mask.png"):
        load_mask(tmp_path / "m_mask.png", (10, 8))


# ---------------------------------------------------------------------------- demo


def test_demo_deterministic_and_layout(tmp_path):
    cats = demo.generate_demo(tmp_path / "a", seed=3, categories=["brick", "washer"], **SMALL)
    demo.generate_demo(tmp_path / "b", seed=3, categories=["brick", "washer"], **SMALL)
    assert cats == ["brick", "washer"]
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a == b
    expected = {"brick/train/good/000.png", "brick/test/good/000.png", "washer/test/scratch/001.png",
                "washer/ground_truth/foreign/001_mask.png"}
    assert expected <= set(a)
    n_per_cat = 2 + 1 + 2 * len(demo.DEFECT_TYPES) * 2  # images + masks
    assert len(a) == 2 * n_per_cat
    other = demo.generate_demo(tmp_path / "c", seed=4, categories=["brick"], **SMALL)
    assert other == ["brick"]
    assert _tree_bytes(tmp_path / "c")["brick/train/good/000.png"] != a["brick/train/good/000.png"]


def test_demo_defaults_readable_by_mvtec_reader(tmp_path):
    cats = demo.generate_demo(tmp_path, seed=0, categories=None, **SMALL)
    assert len(cats) >= 4 and set(demo.DEFECT_TYPES) >= {"scratch", "hole", "stain", "foreign"}
    rows = read_mvtec(tmp_path, "all")
    validate_rows(rows)
    assert categories(rows) == sorted(cats)
    for cat in cats:
        img = load_image(rows_for(rows, cat, "train")[0].image)
        assert img.shape == (64, 64, 3)


def test_demo_masks_binary_nonempty_and_sizes_vary(tmp_path):
    demo.generate_demo(tmp_path, seed=1, categories=["gravel"], n_train=0, n_test_good=0,
                       n_test_defect_per_type=6, size=96)
    areas = []
    for p in sorted((tmp_path / "gravel" / "ground_truth").rglob("*_mask.png")):
        m = np.asarray(Image.open(p))
        assert m.shape == (96, 96) and set(np.unique(m)) <= {0, 255}
        assert (m > 0).any()
        areas.append(int((m > 0).sum()))
    assert len(areas) == 6 * len(demo.DEFECT_TYPES)
    assert max(areas) > 5 * min(areas)


@pytest.mark.parametrize("category", ["grass", "washer", "nut"])
@pytest.mark.parametrize("defect", demo.DEFECT_TYPES)
def test_demo_mask_is_the_changed_region(category, defect):
    for i in range(3):
        clean, img, mask = demo.render_sample(7, category, f"k{i}", defect, 64)
        changed = (clean != img).any(axis=2)
        assert not changed[~mask].any()  # nothing outside the mask changed
        assert changed[mask].mean() > 0.3  # most of the mask is visibly changed
        if category in demo.OBJECTS:  # defects lie on the part, not the background
            _, allowed = demo._object_image(demo._rng(7, "demo", category, f"k{i}"), category, 64)
            assert allowed[mask].all()


def test_demo_object_shape_is_stable():
    a, _, _ = demo.render_sample(0, "washer", "x", None, 64)
    b, _, _ = demo.render_sample(0, "washer", "y", None, 64)
    fg_a, fg_b = a.mean(2) > 90, b.mean(2) > 90
    assert abs(int(fg_a.sum()) - int(fg_b.sum())) < 0.1 * fg_a.sum()


def test_demo_unknown_category(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        demo.generate_demo(tmp_path, seed=0, categories=["nope"], **SMALL)


# ---------------------------------------------------------------------------- readers


def test_read_mvtec(mvtec_tree):
    rows = read_mvtec(mvtec_tree, "all")
    validate_rows(rows)
    assert categories(rows) == ["alpha", "beta"]
    assert rows == read_mvtec(mvtec_tree, ["alpha", "beta"])
    for cat in ("alpha", "beta"):
        train, test = rows_for(rows, cat, "train"), rows_for(rows, cat, "test")
        assert len(train) == 5 and all(r.label == 0 and r.mask == "" for r in train)
        assert Counter(r.defect_type for r in test) == {"good": 3, "bright": 2, "dark": 2}
        for r in test:
            assert (r.label == 1) == (r.defect_type != "good") == bool(r.mask)
            if r.mask:
                assert load_mask(r.mask, image_size(r.image)).any()
    assert rows[0].id == "alpha/train/good/000" and all(r.shot == 0 for r in rows)
    assert len({r.id for r in rows}) == len(rows)
    assert [r.id for r in read_mvtec(mvtec_tree, ["beta"])] == [r.id for r in rows_for(rows, "beta")]


def test_read_mvtec_uppercase_extension(mvtec_tree):
    p = mvtec_tree / "alpha" / "train" / "good" / "000.png"
    p.rename(p.with_name("000.PNG"))
    assert len(rows_for(read_mvtec(mvtec_tree, ["alpha"]), "alpha", "train")) == 5


def test_read_mvtec_missing_mask(mvtec_tree):
    (mvtec_tree / "alpha" / "ground_truth" / "dark" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="001_mask.png"):
        read_mvtec(mvtec_tree, "all")


def test_read_mvtec_unknown_and_empty_category(mvtec_tree):
    with pytest.raises(DataError, match="gamma"):
        read_mvtec(mvtec_tree, ["alpha", "gamma"])
    for p in (mvtec_tree / "beta" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="beta"):
        read_mvtec(mvtec_tree, ["beta"])
    shutil.rmtree(mvtec_tree / "alpha" / "test")
    with pytest.raises(DataError, match="alpha"):
        read_mvtec(mvtec_tree, ["alpha"])


def test_validate_rows_mask_size_mismatch(mvtec_tree):
    bad = mvtec_tree / "alpha" / "ground_truth" / "bright" / "000_mask.png"
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(bad)
    rows = read_mvtec(mvtec_tree, ["alpha"])
    with pytest.raises(DataError, match="000_mask.png"):
        validate_rows(rows)


def test_validate_rows_corrupt_image(mvtec_tree):
    (mvtec_tree / "alpha" / "test" / "good" / "001.png").write_bytes(b"\x00garbage" * 10)
    rows = read_mvtec(mvtec_tree, ["alpha"])
    with pytest.raises(DataError, match="001.png"):
        validate_rows(rows)


def test_read_visa(visa_tree):
    rows = read_visa(visa_tree, "all")
    validate_rows(rows)
    assert categories(rows) == ["candle", "pcb1"]
    for cat in ("candle", "pcb1"):
        assert len(rows_for(rows, cat, "train")) == 5
        test = rows_for(rows, cat, "test")
        assert Counter(r.defect_type for r in test) == {"good": 2, "anomaly": 3}
        assert all(bool(r.mask) == (r.label == 1) for r in test)
    assert len(read_visa(visa_tree, ["pcb1"])) == 10


def test_read_visa_errors(visa_tree):
    with pytest.raises(DataError, match="nope"):
        read_visa(visa_tree, ["nope"])
    (visa_tree / "pcb1" / "Data" / "Masks" / "Anomaly" / "002.png").unlink()
    with pytest.raises(DataError, match="002.png"):
        read_visa(visa_tree, ["pcb1"])
    (visa_tree / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match="split_csv/1cls.csv"):
        read_visa(visa_tree, "all")


def test_read_imagefolder(imagefolder_tree):
    rows = read_imagefolder(imagefolder_tree, "all")
    validate_rows(rows)
    assert categories(rows) == ["images"]
    assert Counter(r.defect_type for r in rows) == {"circles": 8, "squares": 8, "stripes": 8}
    assert all(r.split == "train" and r.label == 0 and r.mask == "" for r in rows)
    assert len(read_imagefolder(imagefolder_tree, ["squares"])) == 8
    (imagefolder_tree / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        read_imagefolder(imagefolder_tree, "all")


# ---------------------------------------------------------------------------- manifest


def test_manifest_roundtrip_and_columns(tmp_path, mvtec_tree):
    rows = read_mvtec(mvtec_tree, "all")
    path = tmp_path / "out" / "manifest.csv"
    write_manifest(rows, path)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert read_manifest(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["manifest.csv"]  # no temp file left
    bad = tmp_path / "bad.csv"
    bad.write_text("id,category,split\nx,y,train\n")
    with pytest.raises(DataError, match="bad.csv"):
        read_manifest(bad)


def test_path_str_relative_under_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert path_str(tmp_path / "a" / "b.png") == "a/b.png"
    outside = Path(os.path.abspath(os.sep)) / "elsewhere" / "x.png"
    assert path_str(outside) == outside.as_posix()


def _anomaly_rows() -> list[Row]:
    rows = []
    for cat in ("c1", "c2"):
        rows += [Row(f"{cat}/train/good/{i}", cat, "train", 0, "good", f"{cat}/tr{i}.png", "", 0) for i in range(6)]
        for defect, n in (("good", 10), ("crack", 5), ("cut", 2), ("one", 1)):
            label = int(defect != "good")
            rows += [Row(f"{cat}/test/{defect}/{i}", cat, "test", label, defect, f"{cat}/{defect}{i}.png",
                         f"{cat}/{defect}{i}_mask.png" if label else "", 0) for i in range(n)]
    return rows


def test_carve_val_stratified_disjoint_deterministic():
    rows = _anomaly_rows()
    out = carve_val(rows, 0.3, seed=0)
    assert out == carve_val(rows, 0.3, seed=0) and out != carve_val(rows, 0.3, seed=1)
    assert [r.id for r in out] == [r.id for r in rows] and rows == _anomaly_rows()  # input untouched
    val = {r.id for r in out if r.split == "val"}
    test = {r.id for r in out if r.split == "test"}
    assert val and not val & test and len(val | test) == sum(r.split == "test" for r in rows)
    assert all(r.split == "train" for r in out if "/train/" in r.id)
    for cat in ("c1", "c2"):
        counts = Counter((r.defect_type, r.split) for r in out if r.category == cat)
        assert counts[("good", "val")] == 3 and counts[("crack", "val")] == 2
        assert counts[("cut", "val")] == 1 and counts[("cut", "test")] == 1
        assert counts[("one", "test")] == 1 and counts[("one", "val")] == 0
    assert carve_val(rows, 0.0, seed=0) == rows
    with pytest.raises(ConfigError):
        carve_val(rows, 1.0, seed=0)


def test_select_shots():
    rows = carve_val(_anomaly_rows(), 0.3, seed=0)
    out = select_shots(rows, 4, seed=0)
    assert out == select_shots(rows, 4, seed=0)
    for cat in ("c1", "c2"):
        shots = [r for r in out if r.category == cat and r.shot]
        assert len(shots) == 4 and all(r.split == "train" and r.label == 0 for r in shots)
    assert sum(r.shot for r in select_shots(out, 1, seed=0)) == 2  # previous shots are reset
    assert sum(r.shot for r in select_shots(rows, "all", seed=0)) == 12
    assert sum(r.shot for r in select_shots(rows, 0, seed=0)) == 0
    with pytest.raises(DataError, match=r"c1.*7.*6"):
        select_shots(rows, 7, seed=0)


def test_split_classification_and_shots_per_class(imagefolder_tree):
    rows = read_imagefolder(imagefolder_tree, "all")
    out = split_classification(rows, 0.25, 0.25, seed=0)
    assert out == split_classification(rows, 0.25, 0.25, seed=0)
    counts = Counter((r.defect_type, r.split) for r in out)
    for cls in ("circles", "squares", "stripes"):
        assert counts[(cls, "train")] == 4 and counts[(cls, "val")] == 2 and counts[(cls, "test")] == 2
    shots = select_shots(out, 2, seed=0)
    assert Counter(r.defect_type for r in shots if r.shot) == {"circles": 2, "squares": 2, "stripes": 2}
    with pytest.raises(DataError, match="circles"):
        select_shots(out, 5, seed=0)
