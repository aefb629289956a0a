"""Dataset readers: directory trees / CSV splits -> manifest :class:`Row` lists.

Every reader returns rows with ``split`` ``train`` or ``test`` (val is carved later by
:func:`anomaly_core.data.manifest.carve_val`) and ``shot=0``, sorted deterministically.
Layout problems raise :class:`DataError` naming the offending path or category.

Supported layouts:

* MVTec AD: ``<cat>/train/good/*``, ``<cat>/test/<defect>/*``,
  ``<cat>/ground_truth/<defect>/<stem>_mask.png``.
* VisA: ``split_csv/1cls.csv`` with columns ``object,split,label,image,mask``.
* ImageFolder: ``<root>/<class>/*`` (classification; category ``images``).
* Folder (anomalib's Folder datamodule): ``<root>/<normal_dir>/*`` good images, ``<root>/<abnormal_dir>/*``
  defect images, optional ``<root>/<mask_dir>/<stem>[_mask].<ext>`` masks, optional ``<root>/<normal_test_dir>/*``
  good test images (else a seeded share ``normal_split_ratio`` of the good images is tested); one category,
  named after ``root``.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

from anomaly_core.data.images import IMAGE_EXTENSIONS, image_size, is_image_file
from anomaly_core.data.manifest import Row, make_id, path_str
from anomaly_core.errors import DataError

__all__ = [
    "read_mvtec",
    "read_visa",
    "read_imagefolder",
    "read_folder",
    "validate_rows",
    "read_dataset",
    "READERS",
    "IMAGEFOLDER_CATEGORY",
]

IMAGEFOLDER_CATEGORY = "images"
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")

Categories = Sequence[str] | str


# ---------------------------------------------------------------------------- helpers


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} not found: {path} is not a directory")
    return path


def _list_images(directory: Path) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name."""
    return sorted((p for p in directory.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)


def _subdirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _is_all(categories: Categories | None) -> bool:
    return categories is None or (isinstance(categories, str) and categories.lower() == "all")


def _as_list(categories: Categories) -> list[str]:
    if isinstance(categories, str):
        return [categories]
    names = list(categories)
    if not names:
        raise DataError("empty category list")
    return names


def _check_unique_ids(rows: Iterable[Row]) -> None:
    dup = [k for k, n in Counter(r.id for r in rows).items() if n > 1]
    if dup:
        raise DataError(f"duplicate image ids (same file stem with different extensions?): {dup[:5]}")


# ---------------------------------------------------------------------------- MVTec AD


def _find_mvtec_mask(gt_dir: Path, stem: str) -> Path:
    """``<gt_dir>/<stem>_mask.png``; other image extensions and ``<stem>.<ext>`` are accepted too."""
    expected = gt_dir / f"{stem}_mask.png"
    if expected.is_file():
        return expected
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for cand in (gt_dir / f"{name}{ext}", gt_dir / f"{name}{ext.upper()}"):
                if cand.is_file():
                    return cand
    raise DataError(f"missing mask for a defect image: {expected} does not exist")


def _mvtec_train(cat: str, cat_dir: Path) -> list[Row]:
    good = cat_dir / "train" / "good"
    images = _list_images(good) if good.is_dir() else []
    if not images:
        raise DataError(f"category {cat!r} has no training images in {good}")
    return [
        Row(make_id(cat, "train", "good", p.stem), cat, "train", 0, "good", path_str(p), "", 0)
        for p in images
    ]


def _mvtec_test(cat: str, cat_dir: Path) -> list[Row]:
    test_dir = cat_dir / "test"
    rows: list[Row] = []
    for defect_dir in _subdirs(test_dir) if test_dir.is_dir() else []:
        defect = defect_dir.name
        for p in _list_images(defect_dir):
            if defect == "good":
                rows.append(Row(make_id(cat, "test", defect, p.stem), cat, "test", 0, defect, path_str(p), "", 0))
                continue
            mask = _find_mvtec_mask(cat_dir / "ground_truth" / defect, p.stem)
            row_id = make_id(cat, "test", defect, p.stem)
            rows.append(Row(row_id, cat, "test", 1, defect, path_str(p), path_str(mask), 0))
    if not rows:
        raise DataError(f"category {cat!r} has no test images in {test_dir}")
    return rows


def _mvtec_categories(root: Path, categories: Categories) -> list[str]:
    if not _is_all(categories):
        return _as_list(categories)
    found = [d.name for d in _subdirs(root) if (d / "train").is_dir()]
    if not found:
        raise DataError(f"no MVTec categories (directories containing train/) found in {root}")
    return found


def read_mvtec(root: str | os.PathLike, categories: Categories) -> list[Row]:
    """Read an MVTec-AD layout tree.

    Args:
        root: dataset root holding one directory per category.
        categories: list of category names, or ``"all"`` (every subdirectory with ``train/``).
    Returns:
        rows sorted by (category, train before test, defect type, file name).
    """
    root = _require_dir(Path(root), "dataset root")
    rows: list[Row] = []
    for cat in _mvtec_categories(root, categories):
        cat_dir = root / cat
        if not cat_dir.is_dir():
            raise DataError(f"category {cat!r} not found: {cat_dir} does not exist")
        rows += _mvtec_train(cat, cat_dir) + _mvtec_test(cat, cat_dir)
    _check_unique_ids(rows)
    return rows


# ---------------------------------------------------------------------------- VisA


def _read_visa_csv(root: Path) -> list[dict[str, str]]:
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        raise DataError(f"VisA split file {VISA_CSV.as_posix()} not found: {csv_path} does not exist")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path} lacks columns {missing} (has {reader.fieldnames})")
        return [{k: (v or "").strip() for k, v in rec.items() if k in VISA_COLUMNS} for rec in reader]


def _visa_row(rec: dict[str, str], root: Path, csv_line: int) -> Row:
    where = f"{root / VISA_CSV} line {csv_line}"
    split, label = rec["split"].lower(), rec["label"].lower()
    if split not in ("train", "test"):
        raise DataError(f"{where}: split {rec['split']!r} is not train/test")
    if label not in ("normal", "anomaly"):
        raise DataError(f"{where}: label {rec['label']!r} is not normal/anomaly")
    image = root / rec["image"]
    if not image.is_file():
        raise DataError(f"{where}: image {image} does not exist")
    is_anomaly = label == "anomaly"
    mask = ""
    if is_anomaly:
        mask_path = root / rec["mask"] if rec["mask"] else None
        if mask_path is None or not mask_path.is_file():
            raise DataError(f"{where}: missing mask for anomalous image {image}: {mask_path} does not exist")
        mask = path_str(mask_path)
    defect = "anomaly" if is_anomaly else "good"
    cat = rec["object"]
    return Row(make_id(cat, split, defect, image.stem), cat, split, int(is_anomaly), defect, path_str(image), mask, 0)


def _sort_key(row: Row) -> tuple:
    return (row.category, row.split != "train", row.defect_type, row.id)


def read_visa(root: str | os.PathLike, categories: Categories) -> list[Row]:
    """Read VisA via ``root/split_csv/1cls.csv`` (paths in the CSV are relative to ``root``).

    Anomalies get ``defect_type="anomaly"`` (1cls.csv carries no defect names).
    """
    root = _require_dir(Path(root), "dataset root")
    records = _read_visa_csv(root)
    present = sorted({r["object"] for r in records})
    wanted = present if _is_all(categories) else _as_list(categories)
    for cat in wanted:
        if cat not in present:
            raise DataError(f"category {cat!r} not found in {root / VISA_CSV}")
    keep = set(wanted)
    rows = [_visa_row(rec, root, i + 2) for i, rec in enumerate(records) if rec["object"] in keep]
    for cat in wanted:
        for split in ("train", "test"):
            if not any(r.category == cat and r.split == split for r in rows):
                raise DataError(f"category {cat!r} has no {split} images in {root / VISA_CSV}")
    rows.sort(key=_sort_key)
    _check_unique_ids(rows)
    return rows


# ---------------------------------------------------------------------------- ImageFolder


def read_imagefolder(root: str | os.PathLike, categories: Categories = "all") -> list[Row]:
    """Read ``<root>/<class>/*`` for classification.

    All rows get category ``images``, ``defect_type`` = class name, label 0 and split
    ``train``; :func:`split_classification` then carves val/test per class.

    Args:
        categories: ``"all"`` (or ``["images"]``) for every class directory, or a list of
            class names to include.
    """
    root = _require_dir(Path(root), "dataset root")
    class_dirs = {d.name: d for d in _subdirs(root)}
    if not class_dirs:
        raise DataError(f"no class directories found in {root}")
    if _is_all(categories) or list(_as_list(categories)) == [IMAGEFOLDER_CATEGORY]:
        wanted = sorted(class_dirs)
    else:
        wanted = sorted(_as_list(categories))
    rows: list[Row] = []
    for cls in wanted:
        if cls not in class_dirs:
            raise DataError(f"class {cls!r} not found: {root / cls} does not exist")
        images = _list_images(class_dirs[cls])
        if not images:
            raise DataError(f"class directory {class_dirs[cls]} contains no images")
        cat = IMAGEFOLDER_CATEGORY
        rows += [Row(make_id(cat, "train", cls, p.stem), cat, "train", 0, cls, path_str(p), "", 0) for p in images]
    _check_unique_ids(rows)
    return rows


# ---------------------------------------------------------------------------- Folder (good / bad, masks optional)


def read_folder(root: str | os.PathLike, normal_dir: str, abnormal_dir: str, mask_dir: str = "",
                normal_test_dir: str = "", normal_split_ratio: float = 0.2, seed: int = 0) -> list[Row]:
    """Read a good / defect folder pair (see the module docstring). Without ``mask_dir`` defect rows have no mask
    (pixel metrics are then not available). The train / test split of the good images is seeded by ``seed``.
    """
    from anomaly_core.data.manifest import stable_rng

    root = _require_dir(Path(root), "dataset root")
    cat = root.resolve().name
    def images(sub: str, what: str) -> list[Path]:
        found = _list_images(_require_dir(root / sub, f"data.folder.{what}"))
        if not found:
            raise DataError(f"data.folder.{what}: no images in {root / sub}")
        return found

    normals, defects = images(normal_dir, "normal_dir"), images(abnormal_dir, "abnormal_dir")
    if normal_test_dir:
        train, test = normals, images(normal_test_dir, "normal_test_dir")
    else:
        n_test = max(1, int(round(normal_split_ratio * len(normals))))
        if n_test >= len(normals):
            raise DataError(f"data.folder.normal_dir: {len(normals)} good images cannot give train and test "
                            f"(add images or set data.folder.normal_test_dir)")
        picked = set(stable_rng(seed, f"folder/{cat}").permutation(len(normals))[:n_test].tolist())
        train = [p for i, p in enumerate(normals) if i not in picked]
        test = [p for i, p in enumerate(normals) if i in picked]
    mdir = _require_dir(root / mask_dir, "data.folder.mask_dir") if mask_dir else None
    rows = [Row(make_id(cat, "train", "good", p.stem), cat, "train", 0, "good", path_str(p), "", 0) for p in train]
    rows += [Row(make_id(cat, "test", "good", p.stem), cat, "test", 0, "good", path_str(p), "", 0) for p in test]
    rows += [Row(make_id(cat, "test", "defect", p.stem), cat, "test", 1, "defect", path_str(p),
                 path_str(_find_mvtec_mask(mdir, p.stem)) if mdir else "", 0) for p in defects]
    _check_unique_ids(rows)
    return rows


READERS: dict[str, Callable[..., list[Row]]] = {
    "mvtec": read_mvtec,
    "visa": read_visa,
    "imagefolder": read_imagefolder,
    "folder": read_folder,
}


# ---------------------------------------------------------------------------- validation


def validate_rows(rows: Iterable[Row]) -> None:
    """Check (header only, fast) that every image opens and each mask matches its image size.

    Raises:
        DataError naming the unreadable image or the mismatching mask file.
    """
    rows = list(rows)
    _check_unique_ids(rows)
    for r in rows:
        hw = image_size(r.image)
        if not r.mask:
            continue
        try:
            mhw = image_size(r.mask)
        except DataError as exc:
            raise DataError(f"cannot read mask {r.mask}: {exc}") from exc
        if mhw != hw:
            raise DataError(
                f"mask {r.mask} has size {mhw[0]}x{mhw[1]} (HxW) but its image {r.image} has size {hw[0]}x{hw[1]}"
            )


def read_dataset(cfg, demo_root: str | os.PathLike, seed: int = 0) -> list[Row]:
    """The rows of the dataset a `data` section names (a `DataConfig`): the demo tree at `demo_root`, or
    `cfg.root` in `cfg.format`. `prepare` reads its images with it and `fingerprint` hashes exactly these files."""
    from anomaly_core.errors import ConfigError

    if cfg.format == "demo":
        return read_mvtec(demo_root, cfg.categories)
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root={cfg.root}: directory not found (point it at your {cfg.format} dataset)")
    if cfg.format == "folder":
        f = cfg.folder
        return read_folder(root, f.normal_dir, f.abnormal_dir, f.mask_dir, f.normal_test_dir, f.normal_split_ratio,
                           seed)
    return READERS[cfg.format](root, cfg.categories)
