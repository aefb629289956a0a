"""The MVTec-AD-sized generator option (anomaly_core.data.demo) and the scale benchmark's helpers (scripts/)."""
from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from anomaly_core.data import demo
from anomaly_core.errors import ConfigError

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "scripts"


def _script(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def test_default_demo_tree_is_byte_identical(tmp_path):
    """The default demo (what the demo_data stage writes with params.yaml's data.demo) keeps every file's bytes:
    the fixture holds the sha256 of each of its 352 files, made before the MVTec-sized categories were added."""
    want = json.loads((HERE / "fixtures" / "demo_default_sha256.json").read_text())
    assert demo.generate_demo(tmp_path, 0) == ["brick", "grass", "gravel", "washer"]
    got = {p.relative_to(tmp_path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert len(want) == 352
    changed = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    assert not changed, f"{len(changed)} files differ, e.g. {changed[:3]}"


def test_mvtec_sized_counts():
    full = demo.mvtec_sized()
    assert len(full["categories"]) == 15 and len(set(full["categories"])) == 15
    assert set(demo.DEFAULT_CATEGORIES) <= set(full["categories"])
    textures = [c for c in full["categories"] if c in demo.TEXTURES or c in demo.EXTRA_TEXTURES]
    assert len(textures) == 5  # MVTec AD: 5 textures, 10 objects
    assert (full["n_train"], full["n_test_good"] + 4 * full["n_test_defect_per_type"], full["size"]) == (240, 115, 256)
    assert 15 * full["n_train"] == 3600  # MVTec AD: 3,629 training images, 1,725 test
    tenth = demo.mvtec_sized(0.1, 4)
    assert (tenth["n_train"], tenth["n_test_good"], tenth["n_test_defect_per_type"]) == (24, 4, 2)
    assert tenth["categories"] == full["categories"][:4]
    assert demo.mvtec_sized(0.001)["n_test_defect_per_type"] == 1
    for bad in (0, 1.5, -1):
        with pytest.raises(ConfigError, match="scale"):
            demo.mvtec_sized(bad)
    with pytest.raises(ConfigError, match="1..15"):
        demo.mvtec_sized(1.0, 16)


def test_mvtec_sized_tree_every_category(tmp_path):
    """All 15 categories generate; the new ones differ from each other; the tree is byte-reproducible."""
    kw = {**demo.mvtec_sized(0.01), "size": 96}  # the gasket's thin ring takes a scratch from ~96 px
    cats = demo.generate_demo(tmp_path / "a", 3, **kw)
    assert len(cats) == 15
    imgs = {}
    for cat in cats:
        assert len(list((tmp_path / "a" / cat / "train" / "good").glob("*.png"))) == 2
        assert len(list((tmp_path / "a" / cat / "ground_truth").rglob("*_mask.png"))) == 4
        imgs[cat] = np.asarray(demo.render_sample(3, cat, "train/good/0", None, 96)[1], np.float32)
    for i, a in enumerate(cats):  # no two categories draw the same picture
        for b in cats[i + 1:]:
            assert np.abs(imgs[a] - imgs[b]).mean() > 2.0, (a, b)
    demo.generate_demo(tmp_path / "b", 3, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


@pytest.mark.parametrize("category", ["lunar", "tissue", "gasket", "disc", "triangle_plate", "brass_nut"])
@pytest.mark.parametrize("defect", demo.DEFECT_TYPES)
def test_new_category_mask_is_the_changed_region(category, defect):
    for i in range(2):
        clean, img, mask = demo.render_sample(5, category, f"k{i}", defect, 64)
        changed = (clean != img).any(axis=2)
        assert mask.sum() >= 6 and not changed[~mask].any()
        assert changed[mask].mean() > 0.3
        if category in demo.EXTRA_OBJECTS:  # defects lie on the part
            _, allowed = demo._object_image(demo._rng(5, "demo", category, f"k{i}"), category, 64)
            assert allowed[mask].all()


def test_fit_exponent_recovers_power_laws():
    fit = _script("benchmark").fit_exponent
    xs = [16, 64, 240]
    assert fit(xs, [3.0 * x ** 1.5 for x in xs]) == pytest.approx(1.5, abs=1e-9)
    assert fit(xs, [7.0 for _ in xs]) == pytest.approx(0.0, abs=1e-9)
    assert fit([4, 8, 15], [0.5 * x for x in [4, 8, 15]]) == pytest.approx(1.0, abs=1e-9)
    # a fixed cost plus a linear one bends the log-log line below 1
    assert 0.3 < fit(xs, [100 + x for x in xs]) < 0.9


def test_subset_tree_and_totals(tmp_path):
    bs = _script("bench_scale")
    demo.generate_demo(tmp_path / "m", 0, ["brick", "washer"], n_train=5, n_test_good=1, n_test_defect_per_type=1,
                       size=32)
    sub = bs.subset_tree(tmp_path / "m", tmp_path / "s", ["washer"], 3)
    assert sorted(p.name for p in (sub / "washer" / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
    assert not (sub / "brick").exists()
    assert len(list((sub / "washer" / "test").rglob("*.png"))) == 5
    assert len(list((sub / "washer" / "ground_truth").rglob("*.png"))) == 4
    run = {"wall": 30.0, "metrics": {}, "stages": [
        {"stage": "validate", "seconds": 2.0, "peak_rss_mb": 900.0},
        {"stage": "prepare", "seconds": 3.0, "peak_rss_mb": 200.0},
        {"stage": "score@knn", "seconds": 10.0, "peak_rss_mb": 700.0},
        {"stage": "export", "seconds": 5.0, "peak_rss_mb": 800.0}]}
    assert bs.totals(run) == {"wall_s": 30.0, "stages_s": 20.0, "prepare_to_evaluate_s": 13.0, "dvc_overhead_s": 10.0,
                              "peak_rss_mb": 900.0, "prepare_to_evaluate_peak_rss_mb": 700.0}


def test_stage_meter_labels():
    label = _script("stage_meter").label
    assert label(["stages/score.py", "--method", "knn", "--config", "x.json"]) == "score@knn"
    assert label(["-m", "anomaly_core.launch", "--nproc", "1", "stages/features.py", "--out", "d"]) == "features"
