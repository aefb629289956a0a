"""The image manifest: one :class:`Row` per image (format fixed in docs/ARCHITECTURE.md).

Row selection helpers (val carving, k-shot selection, classification splits) are pure
functions: they never mutate their input and return new rows in the input order.
Randomness is a numpy Generator seeded with ``(seed, zlib.crc32(stratum name))`` so the
result for one category does not depend on which other categories are present.
"""

from __future__ import annotations

import csv
import os
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from anomaly_core.errors import ConfigError, DataError

__all__ = [
    "COLUMNS",
    "SPLITS",
    "Row",
    "path_str",
    "make_id",
    "write_manifest",
    "read_manifest",
    "carve_val",
    "select_shots",
    "split_classification",
    "rows_for",
    "categories",
    "stable_rng",
]

COLUMNS = ["id", "category", "split", "label", "defect_type", "image", "mask", "shot"]
SPLITS = ("train", "val", "test")


@dataclass
class Row:
    """One manifest row (one image). ``mask`` is "" for normal images."""

    id: str
    category: str
    split: str
    label: int
    defect_type: str
    image: str
    mask: str
    shot: int = 0


assert [f.name for f in fields(Row)] == COLUMNS


# ---------------------------------------------------------------------------- paths / ids


def path_str(path: str | os.PathLike) -> str:
    """Path as stored in the manifest: relative to the cwd when under it, else absolute (POSIX).

    Symlinks are not resolved (DVC may link data files into its cache).
    """
    absolute = Path(os.path.abspath(path))
    cwd = Path(os.path.abspath(os.getcwd()))
    if absolute == cwd or absolute.is_relative_to(cwd):
        return absolute.relative_to(cwd).as_posix()
    return absolute.as_posix()


def make_id(category: str, source_split: str, defect_type: str, stem: str) -> str:
    """Stable row id ``"{category}/{source_split}/{defect_type}/{stem}"``."""
    return f"{category}/{source_split}/{defect_type}/{stem}"


def stable_rng(seed: int, key: str) -> np.random.Generator:
    """numpy Generator derived from ``seed`` and a string key (crc32, not Python's hash())."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])


# ---------------------------------------------------------------------------- CSV io


def write_manifest(rows: Iterable[Row], path: str | os.PathLike) -> None:
    """Write rows as CSV with exactly :data:`COLUMNS`; atomic (temp file + os.replace)."""
    from anomaly_core.io import atomic_path

    with atomic_path(path, ".tmp") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def _parse_int(value: str, column: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"manifest {path} line {line}: column {column!r} is not an integer: {value!r}") from None


def _parse_row(raw: dict[str, str], path: Path, line: int) -> Row:
    if None in raw or any(raw[c] is None for c in COLUMNS):
        raise DataError(f"manifest {path} line {line}: expected {len(COLUMNS)} fields")
    if raw["split"] not in SPLITS:
        raise DataError(f"manifest {path} line {line}: split {raw['split']!r} not in {SPLITS}")
    return Row(
        id=raw["id"],
        category=raw["category"],
        split=raw["split"],
        label=_parse_int(raw["label"], "label", path, line),
        defect_type=raw["defect_type"],
        image=raw["image"],
        mask=raw["mask"],
        shot=_parse_int(raw["shot"], "shot", path, line),
    )


def read_manifest(path: str | os.PathLike) -> list[Row]:
    """Read a manifest CSV. Raises DataError naming the file on a missing file or wrong columns."""
    path = Path(path)
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    with fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != COLUMNS:
            raise DataError(f"manifest {path} has columns {reader.fieldnames}, expected {COLUMNS}")
        return [_parse_row(raw, path, i + 2) for i, raw in enumerate(reader)]


# ---------------------------------------------------------------------------- queries


def rows_for(rows: Iterable[Row], category: str, split: str | None = None) -> list[Row]:
    """Rows of one category (and one split unless ``split`` is None), in manifest order."""
    return [r for r in rows if r.category == category and (split is None or r.split == split)]


def categories(rows: Iterable[Row]) -> list[str]:
    """Sorted unique category names."""
    return sorted({r.category for r in rows})


def _strata(rows: list[Row], indices: Iterable[int]) -> dict[tuple[str, str], list[int]]:
    """Group row indices by (category, defect_type); each group sorted by row id."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in indices:
        groups[(rows[i].category, rows[i].defect_type)].append(i)
    return {k: sorted(v, key=lambda i: rows[i].id) for k, v in sorted(groups.items())}


def _check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")
    return value


# ---------------------------------------------------------------------------- val carving


def _n_val(n: int, fraction: float) -> int:
    """How many of a stratum of ``n`` test images go to val (>=1 and <=n-1 when n>=2)."""
    if fraction <= 0.0 or n < 2:
        return 0
    return int(min(max(round(fraction * n), 1), n - 1))


def carve_val(rows: list[Row], fraction: float, seed: int) -> list[Row]:
    """Move a seeded fraction of ``test`` rows to ``val``, stratified by (category, defect_type).

    A stratum with >=2 images keeps at least one in test and (fraction > 0) moves at least
    one to val; a single-image stratum stays in test. Returns new rows in input order.
    """
    fraction = _check_fraction(fraction, "val fraction")
    out = list(rows)
    test_idx = [i for i, r in enumerate(rows) if r.split == "test"]
    for (cat, defect), idx in _strata(out, test_idx).items():
        k = _n_val(len(idx), fraction)
        if k == 0:
            continue
        chosen = stable_rng(seed, f"val/{cat}/{defect}").choice(len(idx), size=k, replace=False)
        for j in chosen:
            out[idx[j]] = replace(out[idx[j]], split="val")
    return out


# ---------------------------------------------------------------------------- k-shot


def _parse_shots(shots: int | str) -> int | None:
    """``"all"`` -> None, otherwise a non-negative int."""
    if isinstance(shots, str):
        if shots.strip().lower() == "all":
            return None
        if not shots.strip().isdigit():
            raise ConfigError(f"shots must be a non-negative integer or 'all', got {shots!r}")
        return int(shots)
    if isinstance(shots, bool) or int(shots) != shots or shots < 0:
        raise ConfigError(f"shots must be a non-negative integer or 'all', got {shots!r}")
    return int(shots)


def select_shots(rows: list[Row], shots: int | Literal["all"], seed: int, normal_only: bool = True) -> list[Row]:
    """Mark ``shot=1`` on k seeded normal ``train`` rows per category (all others get 0).

    ``normal_only=False`` (the classification task) draws k train rows of every class, defects included.

    Strata are (category, defect_type): for MVTec/VisA train normals are all ``good`` so
    this is k per category; for ImageFolder (category ``images``) it is k per class.
    ``shots="all"`` marks every normal train row.

    Raises:
        DataError naming the category when fewer than k normal train images exist.
    """
    k = _parse_shots(shots)
    out = [replace(r, shot=0) if r.shot else r for r in rows]
    normal_train = [i for i, r in enumerate(rows) if r.split == "train" and (r.label == 0 or not normal_only)]
    strata = _strata(out, normal_train)
    if k:  # a requested category without any normal train rows
        for cat in categories(rows):
            if not any(c == cat for c, _ in strata):
                raise DataError(f"category {cat!r}: {k} shots requested but only 0 normal train images exist")
    for (cat, defect), idx in strata.items():
        if k is None:
            chosen = range(len(idx))
        elif k > len(idx):
            what = f"category {cat!r}" + ("" if defect == "good" else f" class {defect!r}")
            raise DataError(f"{what}: {k} shots requested but only {len(idx)} normal train images exist")
        else:
            chosen = stable_rng(seed, f"shots/{cat}/{defect}").choice(len(idx), size=k, replace=False)
        for j in chosen:
            out[idx[j]] = replace(out[idx[j]], shot=1)
    return out


# ---------------------------------------------------------------------------- classification


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of n images; train keeps >=1, then test, then val get >=1."""
    n_test = max(round(test_fraction * n), 1) if test_fraction > 0 else 0
    n_val = max(round(val_fraction * n), 1) if val_fraction > 0 else 0
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - 1 - n_test, 0))
    return int(n_val), int(n_test)


def split_classification(
    rows: list[Row], val_fraction: float, test_fraction: float, seed: int
) -> list[Row]:
    """Split ``train`` rows into train/val/test, stratified per (category, class=defect_type).

    Used for ImageFolder classification data. Each class keeps >=1 train image (for shots).
    Returns new rows in input order.
    """
    val_fraction = _check_fraction(val_fraction, "val fraction")
    test_fraction = _check_fraction(test_fraction, "test fraction")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"val + test fractions must be < 1, got {val_fraction} + {test_fraction}")
    out = list(rows)
    train_idx = [i for i, r in enumerate(rows) if r.split == "train"]
    for (cat, cls), idx in _strata(out, train_idx).items():
        n_val, n_test = _split_counts(len(idx), val_fraction, test_fraction)
        perm = stable_rng(seed, f"cls/{cat}/{cls}").permutation(len(idx))
        for j in perm[:n_test]:
            out[idx[j]] = replace(out[idx[j]], split="test")
        for j in perm[n_test : n_test + n_val]:
            out[idx[j]] = replace(out[idx[j]], split="val")
    return out


def classification_rows(rows: list[Row], val_fraction: float, test_fraction: float, shots, seed: int) -> list[Row]:
    """The few-shot classification task: classes are `defect_type`s ("good" included) of each category.

    ImageFolder rows are used as they are; for anomaly datasets the labelled test images (every defect type
    and good) are re-dealt into train / val / test, stratified per (category, class), and k shots per class
    are drawn from train.
    """
    if any(r.split == "test" for r in rows):
        rows = [replace(r, split="train", shot=0) for r in rows if r.split == "test"]
    rows = split_classification(rows, val_fraction, test_fraction, seed)
    if shots != "all":  # the same k for every class, capped by the smallest class's training images
        counts: dict[tuple[str, str], int] = {}
        for r in rows:
            if r.split == "train":
                counts[(r.category, r.defect_type)] = counts.get((r.category, r.defect_type), 0) + 1
        shots = min([int(shots), *counts.values()])
    return select_shots(rows, shots, seed, normal_only=False)


def class_label(row: Row, multi_category: bool) -> str:
    """The class of a row in the classification task: `defect_type`, prefixed by the category when the
    dataset has several categories (demo / MVTec / VisA)."""
    return f"{row.category}/{row.defect_type}" if multi_category else row.defect_type
