"""Shared fixtures: tiny dataset trees (64x64 images) built in ``tmp_path``.

* ``mvtec_tree``: MVTec AD layout, categories ``alpha`` (PNG) and ``beta`` (JPEG images,
  PNG masks); per category 5 train goods, 3 test goods, defects ``bright`` (light square)
  and ``dark`` (dark disk), 2 images each, masks ``ground_truth/<defect>/<stem>_mask.png``
  equal to the painted region.
* ``visa_tree``: VisA layout (``<obj>/Data/Images/{Normal,Anomaly}/*.JPG``,
  ``<obj>/Data/Masks/Anomaly/*.png``, ``split_csv/1cls.csv``), objects ``candle`` and
  ``pcb1``; per object 5 train normals, 2 test normals, 3 test anomalies.
* ``imagefolder_tree``: classes ``circles``, ``squares``, ``stripes`` (8 JPEGs each).

Each fixture returns the root ``Path``; the builders are deterministic.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 64
MVTEC_CATEGORIES = ("alpha", "beta")
MVTEC_DEFECTS = ("bright", "dark")
VISA_OBJECTS = ("candle", "pcb1")
IMAGEFOLDER_CLASSES = ("circles", "squares", "stripes")


def _background(rng: np.random.Generator, kind: int) -> np.ndarray:
    """Smooth stripes / checker pattern plus noise: uint8 [64, 64, 3]."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    base = 120 + 40 * np.sin(xx / 3.0) if kind == 0 else 120 + 40 * np.sign(np.sin(xx / 4.0) * np.sin(yy / 4.0))
    img = base[:, :, None] * np.array([1.0, 0.9, 0.8], np.float32) + rng.normal(0, 4, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _defect_mask(rng: np.random.Generator, defect: str) -> np.ndarray:
    """Square (bright) or disk (dark) region: bool [64, 64]."""
    cy, cx = rng.integers(16, 48, 2)
    r = int(rng.integers(4, 9))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if defect == "bright":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _defect_image(rng: np.random.Generator, kind: int, defect: str) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [64, 64, 3], mask bool [64, 64])."""
    img = _background(rng, kind)
    mask = _defect_mask(rng, defect)
    img[mask] = 245 if defect in ("bright", "anomaly") else 10
    return img, mask


def _save(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _save_mask(mask: np.ndarray, path: Path) -> Path:
    return _save(mask.astype(np.uint8) * 255, path)


def make_mvtec_tree(root: Path, seed: int = 0) -> Path:
    """Build the MVTec-layout tree described in the module docstring under ``root``."""
    rng = np.random.default_rng(seed)
    for kind, cat in enumerate(MVTEC_CATEGORIES):
        ext = ".png" if kind == 0 else ".jpg"
        for i in range(5):
            _save(_background(rng, kind), root / cat / "train" / "good" / f"{i:03d}{ext}")
        for i in range(3):
            _save(_background(rng, kind), root / cat / "test" / "good" / f"{i:03d}{ext}")
        for defect in MVTEC_DEFECTS:
            for i in range(2):
                img, mask = _defect_image(rng, kind, defect)
                _save(img, root / cat / "test" / defect / f"{i:03d}{ext}")
                _save_mask(mask, root / cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def make_visa_tree(root: Path, seed: int = 0, n_normal: int = 7, n_anomaly: int = 3) -> Path:
    """Build the VisA-layout tree (with ``split_csv/1cls.csv``) under ``root``: per object `n_normal` normal
    images (5 train, the rest test) and `n_anomaly` anomalies (test)."""
    rng = np.random.default_rng(seed)
    records = []
    for kind, obj in enumerate(VISA_OBJECTS):
        for i in range(n_normal):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _save(_background(rng, kind), root / rel)
            records.append((obj, "train" if i < 5 else "test", "normal", rel, ""))
        for i in range(n_anomaly):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mask_rel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            img, mask = _defect_image(rng, kind, "anomaly")
            _save(img, root / rel)
            _save_mask(mask, root / mask_rel)
            records.append((obj, "test", "anomaly", rel, mask_rel))
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(records)
    return root


def _class_image(rng: np.random.Generator, cls: str) -> np.ndarray:
    """Visually distinct class content: uint8 [64, 64, 3]."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    cy, cx = rng.uniform(20, 44, 2)
    if cls == "circles":
        fg = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(8, 16) ** 2
    elif cls == "squares":
        half = rng.uniform(8, 16)
        fg = (np.abs(yy - cy) < half) & (np.abs(xx - cx) < half)
    else:
        fg = np.sin((xx + rng.uniform(0, 6)) / 2.0) > 0
    img = np.where(fg[:, :, None], rng.uniform(180, 240, 3), rng.uniform(20, 80, 3))
    img = img + rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagefolder_tree(root: Path, seed: int = 0) -> Path:
    """Build ``<root>/<class>/*.jpg`` with 8 images per class."""
    rng = np.random.default_rng(seed)
    for cls in IMAGEFOLDER_CLASSES:
        for i in range(8):
            _save(_class_image(rng, cls), root / cls / f"{cls}_{i:02d}.jpg")
    return root


def with_changes(params: dict, changes: dict, sep: str = ".") -> dict:
    """A deep copy of `params` with nested-key changes (`"a.b": value`, keys split on `sep`; None deletes)."""
    import copy

    p = copy.deepcopy(params)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(sep)
        node = p
        for part in parents:
            node = node[part]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return p


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> Path:
    """Root of a tiny MVTec-AD layout tree (categories alpha, beta)."""
    return make_mvtec_tree(tmp_path / "mvtec")


@pytest.fixture
def visa_tree(tmp_path: Path) -> Path:
    """Root of a tiny VisA layout tree (objects candle, pcb1)."""
    return make_visa_tree(tmp_path / "visa")


@pytest.fixture
def imagefolder_tree(tmp_path: Path) -> Path:
    """Root of a tiny ImageFolder tree (classes circles, squares, stripes)."""
    return make_imagefolder_tree(tmp_path / "imagefolder")


def predict_copy(bundle: Path, rows, scores: dict, tmp_path: Path, monkeypatch, category: str = "brick"):
    """`predict` on a copy of `bundle` alone (no features around it) of a category's test images, from tmp_path:
    (the predictions, the pipeline's test image scores [N]); asserts no image failed."""
    import shutil

    from anomaly_core.deploy.predict import predict_files

    shutil.copytree(bundle, tmp_path / "bundle")  # only the bundle: no features
    monkeypatch.chdir(tmp_path)
    by_id = {r.id: str(Path(r.image).resolve()) for r in rows}
    ids, image, _ = scores["test"][category]
    got = predict_files("bundle", [by_id[i] for i in ids], "out", category=category, heatmaps=True, batch_size=3,
                        progress=False)
    assert [g["error"] for g in got] == [""] * len(ids)
    return got, image
