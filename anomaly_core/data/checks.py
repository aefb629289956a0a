"""Input checks `prepare` runs before any feature is extracted.

* `check_files(rows)`: every image decoded fully (a truncated PNG fails), in parallel threads; every mask
  readable and of its image's size; a defect image whose mask is all zero -> a warning naming the file.
  All unreadable files are listed in one `DataError` (one line each).
* `class_problems(rows)` / `apply_on_one_class(rows, policy)`: a category whose test (or carved val) split
  lacks good or defect images, or whose defect masks are all empty, cannot be evaluated; `policy="error"`
  refuses it naming the category and the missing class, `"skip"` drops it with a warning.

Warnings are returned as data (lists of one-line strings) so the stage can print them and record them.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Sequence

from anomaly_core.data.images import decode_size, load_mask
from anomaly_core.data.manifest import Row, categories
from anomaly_core.errors import DataError

__all__ = ["check_files", "FileCheck", "class_problems", "apply_on_one_class", "default_workers"]

MAX_LISTED = 20  # unreadable files listed in one error (the count of the rest follows)


@dataclass
class FileCheck:
    """One row's outcome: an error line, or a warning line, or neither; `mask_pixels` defect pixels in its mask."""
    error: str = ""
    warning: str = ""
    mask_pixels: int = 0


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _check_row(row: Row, max_pixels: int | None = None) -> FileCheck:
    try:
        hw = decode_size(row.image, max_pixels)
    except DataError as exc:
        return FileCheck(error=str(exc))
    if not row.mask:
        return FileCheck()
    try:
        mask = load_mask(row.mask, hw)  # [H, W] bool; DataError on unreadable file or size mismatch
    except DataError as exc:
        return FileCheck(error=f"{exc} (mask of {row.image})")
    pixels = int(mask.sum())
    if row.label == 1 and pixels == 0:
        return FileCheck(warning=f"mask {row.mask} of defect image {row.image} is all zero "
                                 f"(the image counts as anomalous, but adds no defect pixel)")
    return FileCheck(mask_pixels=pixels)


def check_files(rows: Sequence[Row], workers: int | None = None, max_pixels: int | None = None) -> tuple[list[str], list[FileCheck]]:
    """Decode every image and mask of `rows` in `workers` threads (PIL releases the GIL while decoding).

    Returns:
        (warnings, per-row FileCheck in row order).
    Raises:
        DataError listing every unreadable image / mask (one line each, at most MAX_LISTED, then a count).
    """
    workers = workers or default_workers()
    if workers == 1:
        results = [_check_row(r, max_pixels) for r in rows]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda r: _check_row(r, max_pixels), rows, chunksize=8))
    errors = [c.error for c in results if c.error]
    if errors:
        more = f"\n... and {len(errors) - MAX_LISTED} more unreadable files" if len(errors) > MAX_LISTED else ""
        raise DataError("\n".join(errors[:MAX_LISTED]) + more)
    return [c.warning for c in results if c.warning], results


def class_problems(rows: Sequence[Row], mask_pixels: dict[str, int] | None = None,
                   splits: Sequence[str] = ("test", "val")) -> dict[str, list[str]]:
    """{category: [what is missing, ...]} for every category whose evaluated splits cannot be scored.

    A split needs good (label 0) and defect (label 1) images; with `mask_pixels` ({row id: defect pixels},
    from `check_files`) its defect masks must hold at least one defect pixel (pixel metrics need both classes).
    """
    out: dict[str, list[str]] = {}
    for cat in categories(list(rows)):
        for split in splits:
            sel = [r for r in rows if r.category == cat and r.split == split]
            if not sel and split != "test":
                continue
            where = f"its {split} split" + (" (carved from test by data.val_fraction)" if split == "val" else "")
            if not any(r.label == 0 for r in sel):
                out.setdefault(cat, []).append(f"{where} has no good (normal) images")
            if not any(r.label == 1 for r in sel):
                out.setdefault(cat, []).append(f"{where} has no defect images")
            elif mask_pixels is not None and not any(mask_pixels.get(r.id, 0) for r in sel if r.label == 1):
                out.setdefault(cat, []).append(f"{where} has no defect pixel in any mask")
    return out


def apply_on_one_class(rows: list[Row], problems: dict[str, list[str]],
                       policy: Literal["error", "skip"]) -> tuple[list[Row], list[str]]:
    """Refuse (`error`) or drop (`skip`) the categories of `problems`. Returns (kept rows, warnings).

    Raises:
        DataError naming every such category and what its splits lack (policy `error`), or when `skip`
        would leave no category at all.
    """
    if not problems:
        return rows, []
    lines = [f"category {cat!r}: {'; '.join(why)}" for cat, why in sorted(problems.items())]
    if policy == "error":
        raise DataError("\n".join(f"{line}; metrics need both classes (add images, or set data.on_one_class=skip)"
                                  for line in lines))
    kept = [r for r in rows if r.category not in problems]
    if not kept:
        raise DataError("every category lacks a class, nothing left to evaluate:\n" + "\n".join(lines))
    return kept, [f"{line}: skipped (data.on_one_class=skip)" for line in lines]
