"""`data.format: folder` (good / defect directories, masks optional): the reader, image-only evaluation, and the
whole DVC pipeline on a folder tree without masks through `export` and `anomaly-core predict`."""
from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import _background, _defect_image, _save, _save_mask

from anomaly_core.data.readers import read_folder
from anomaly_core.errors import DataError
from anomaly_core.evaluation import category_metrics, mean_metrics
from anomaly_core.metrics import image_metrics


def make_folder_tree(root: Path, n_good: int = 12, n_defect: int = 6, masks: bool = False, seed: int = 0) -> Path:
    """root/good/*.png, root/defect/*.png (+ root/masks/<stem>_mask.png when `masks`)."""
    rng = np.random.default_rng(seed)
    for i in range(n_good):
        _save(_background(rng, 0), root / "good" / f"g{i:03d}.png")
    for i in range(n_defect):
        img, mask = _defect_image(rng, 0, "bright")
        _save(img, root / "defect" / f"d{i:03d}.png")
        if masks:
            _save_mask(mask, root / "masks" / f"d{i:03d}_mask.png")
    return root


def test_read_folder_splits_normals_and_reads_optional_masks(tmp_path):
    root = make_folder_tree(tmp_path / "bottles", masks=True)
    rows = read_folder(root, "good", "defect", "", "", 0.25, seed=0)
    assert {r.category for r in rows} == {"bottles"}
    train = [r for r in rows if r.split == "train"]
    test_good = [r for r in rows if r.split == "test" and r.label == 0]
    assert len(train) == 9 and len(test_good) == 3 and all(r.mask == "" for r in rows)
    assert rows == read_folder(root, "good", "defect", "", "", 0.25, seed=0)  # seeded
    assert {r.id for r in test_good} != {r.id for r in read_folder(root, "good", "defect", "", "", 0.25, seed=1)
                                          if r.split == "test" and r.label == 0}
    with_masks = read_folder(root, "good", "defect", "masks", "", 0.25)
    assert all(r.mask.endswith("_mask.png") for r in with_masks if r.label == 1)
    both = read_folder(root, "good", "defect", "", "good", 0.25)  # normal_test_dir: every good image is train too
    assert sum(r.split == "train" for r in both) == 12
    with pytest.raises(DataError, match="data.folder.abnormal_dir"):
        read_folder(root, "good", "missing", "", "", 0.25)


def test_metrics_without_masks_are_image_only():
    labels = np.array([0, 0, 1, 1, 0])
    image = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    maps = np.zeros((5, 4, 4))
    m = category_metrics(labels, None, image, maps)
    assert m == image_metrics(labels, image)
    assert not any(k.startswith("pixel") for k in mean_metrics({"a": m, "b": m}))


# ---------------------------------------------------------------------------- the real pipeline (slow)


@pytest.mark.skipif(os.environ.get("ANOMALY_CORE_E2E") == "0", reason="ANOMALY_CORE_E2E=0")
def test_folder_pipeline_without_masks_exports_and_predicts(tmp_path_factory):
    from test_pipeline import BIN, TINY, make_repo

    tree = make_folder_tree(tmp_path_factory.mktemp("folder") / "bottles", n_good=14, n_defect=8)
    repo = make_repo(tmp_path_factory.mktemp("e2e_folder") / "repo", {
        **TINY, "methods": ["knn", "zero_shot_clip"], "data.format": "folder", "data.root": str(tree),
        "data.categories": "all", "data.folder.normal_split_ratio": 0.4, "export.method": "knn"})
    repo.repro("folder without masks")
    for name in ("summary", "per_category"):
        metrics = repo.json(f"metrics/{name}.json")
        assert "no ground-truth masks" in metrics["_protocol"]["pixel_metrics"]
        for method in ("knn", "zero_shot_clip", "fusion"):
            values = metrics[method] if name == "summary" else metrics[method]["bottles"]
            assert sorted(values) == ["image_ap", "image_auroc", "image_f1max"], values  # absent, never zeros
    threshold = repo.json("metrics/threshold.json")
    assert threshold["method"] == "knn" and "pixel" not in threshold["per_category"]["bottles"]
    assert set(threshold["mean"]) == {"image_precision", "image_recall", "image_f1", "image_fpr"}
    card = repo.json("models/export/model.json")
    assert card["exported"] and card["thresholds"]["bottles"]["pixel"] is None
    out = tmp_path_factory.mktemp("pred")
    subprocess.run([str(BIN / "python"), "-m", "anomaly_core.cli", "predict", str(repo.root / "models/export"),
                    str(tree / "defect"), "--out", str(out)], check=True, cwd=out,
                   env={**os.environ, "PYTHONPATH": str(repo.root), "ANOMALY_CORE_PROGRESS": "0"})
    with open(out / "predictions.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8 and all(r["error"] == "" and r["category"] == "bottles" for r in table)
