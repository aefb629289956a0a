"""Evaluation of method scores against ground truth: per-category anomaly metrics, means, curve data."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from anomaly_core.data.images import image_size, load_mask
from anomaly_core.data.manifest import Row
from anomaly_core.errors import ConfigError, DataError

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_aupro", "pixel_ap")


def masks_for(rows: Sequence[Row], size: int) -> np.ndarray:
    """Ground-truth masks resized (nearest) to the map size: [N, size, size] bool; normal images are empty."""
    out = np.zeros((len(rows), size, size), dtype=bool)
    for i, row in enumerate(rows):
        if row.mask:
            m = load_mask(row.mask, image_size(row.image))
            out[i] = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return out


def at_size(maps: np.ndarray, size: int) -> np.ndarray:
    """Maps [N, h, w] -> [N, size, size] float32 (bilinear, align_corners False); the same array when already that
    size (the default path's metrics are untouched)."""
    if maps.shape[-2:] == (size, size):
        return maps
    x = torch.from_numpy(np.ascontiguousarray(maps)).float()[:, None]
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def align(rows: Sequence[Row], ids: Sequence[str], image: torch.Tensor, maps: torch.Tensor):
    """Reorder a method's scores to the rows' order; every row must have a score."""
    index = {i: n for n, i in enumerate(ids)}
    missing = [r.id for r in rows if r.id not in index]
    if missing:
        raise DataError(f"scores lack {len(missing)} images, e.g. {missing[0]}; re-run `dvc repro score`")
    order = torch.tensor([index[r.id] for r in rows])
    return image[order].numpy(), maps[order].numpy()


def evaluable(labels: np.ndarray, masks: np.ndarray | None, category: str = "", split: str = "test") -> None:
    """DataError naming the category and the missing class when its metrics cannot be computed.

    `prepare` refuses (or skips, `data.on_one_class`) such categories; this guards callers that bypass it.
    labels int [N]; masks bool [N, H, W], or None for a dataset without masks (image metrics only).
    """
    labels = np.asarray(labels)
    missing = [what for what, ok in (("good (normal) images", (labels == 0).any()),
                                     ("defect images", (labels == 1).any()),
                                     ("defect pixel in any mask", masks is None or np.asarray(masks).any())) if not ok]
    if missing:
        raise DataError(f"category {category!r}: the {split} split has no {missing[0]}; metrics need both classes "
                        f"(prepare refuses this with data.on_one_class=error, drops it with skip; re-run prepare)")


def category_metrics(labels: np.ndarray, masks: np.ndarray | None, image: np.ndarray, maps: np.ndarray,
                     max_fpr: float = 0.3, category: str = "", split: str = "test") -> dict[str, float]:
    """All six anomaly metrics for one category (DataError naming it when a class is missing); the image metrics
    only when `masks` is None (a dataset without ground-truth masks: pixel metrics are absent, never zeros)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ConfigError(f"evaluate.max_fpr={max_fpr}: must be in (0, 1]")
    from anomaly_core import metrics  # sklearn: imported by the stages that measure, not by every stage

    evaluable(labels, masks, category, split)
    if masks is None:
        return metrics.image_metrics(labels, image)
    return {**metrics.image_metrics(labels, image), **metrics.pixel_metrics(masks, maps, max_fpr=max_fpr)}


def mean_metrics(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over categories (the MVTec AD / VisA reporting convention) of the metrics every category has."""
    keys = [k for k in IMAGE_METRICS + PIXEL_METRICS if all(k in m for m in per_category.values())]
    return {k: float(np.mean([m[k] for m in per_category.values()])) for k in keys}


def has_masks(rows: Sequence[Row]) -> bool:
    """True when the dataset has ground-truth masks (a folder dataset may have none: image metrics only)."""
    return any(r.mask for r in rows)


NO_MASKS_NOTE = ("the dataset has no ground-truth masks (data.format folder without data.folder.mask_dir): pixel "
                 "metrics (pixel_auroc, pixel_aupro, pixel_ap) are not available and absent from the metrics files")


def rounded(d: dict, places: int = 4) -> dict:
    return {k: rounded(v, places) if isinstance(v, dict) else round(float(v), places) for k, v in d.items()}


def pooled_curves(labels: np.ndarray, scores: np.ndarray) -> dict[str, list]:
    """ROC / PR points over all categories, scores standardised per category beforehand by the caller."""
    from anomaly_core import metrics  # sklearn: imported by the stages that measure, not by every stage

    return metrics.roc_pr_curves(labels, scores)


def standardise(scores: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(scores - mean(ref)) / std(ref): put categories on one scale using validation statistics."""
    return (scores - ref.mean()) / max(float(ref.std()), 1e-12)


def protocol_note(val_fraction: float, untrained: Sequence[str], input_warnings: Sequence[str] = ()) -> dict:
    """The `_protocol` entry every metrics file carries (`input_warnings`: prepare's data/prepared/warnings.json,
    e.g. empty defect masks and categories skipped by data.on_one_class=skip)."""
    note = {
        "reported_split": "test",
        "val_carved_from_test_fraction": val_fraction,
        "note": "every choice (epochs, checkpoints, alpha, temperatures) is made on the validation split carved "
                "from the labelled test images; metrics are on the remaining test images only",
        "untrained_backbones": ", ".join(untrained) if untrained else "none",
    }
    if input_warnings:
        note["input_warnings"] = list(input_warnings)
    return note


# A frame: the image region (start, end) as fractions of the image side (the same on both axes) and the side in
# px the maps and masks are evaluated at. Comparing two systems on the same pixels (scripts/compare_peer_knn.py)
# needs every map brought to one frame: e.g. the whole image at 224 px, or the central 224/256 that a
# Resize 256 + CenterCrop 224 pre-processor keeps.
Frame = tuple[tuple[float, float], int]


def frame_maps(maps: torch.Tensor, src: tuple[float, float], frame: Frame) -> np.ndarray:
    """Maps [N, S, S] covering the image region `src` (fractions of the side) -> the frame's region at its side
    [N, R, R] float32: cut at the nearest map pixels, then bilinear (align_corners False). ValueError when the
    frame reaches outside `src` (the map never saw those pixels)."""
    (f0, f1), res = frame
    s = maps.shape[-1]
    if f0 < src[0] - 1e-9 or f1 > src[1] + 1e-9:
        raise ValueError(f"frame {frame} reaches outside the maps' region {src}")
    scale = s / (src[1] - src[0])
    a, b = round((f0 - src[0]) * scale), round((f1 - src[0]) * scale)
    x = maps[:, a:b, a:b].float()
    if x.shape[-1] != res:
        x = torch.nn.functional.interpolate(x[:, None], size=(res, res), mode="bilinear", align_corners=False)[:, 0]
    return x.numpy()


def frame_masks(rows: Sequence[Row], frame: Frame) -> np.ndarray:
    """Native ground-truth masks -> the frame's region (cut at the nearest native pixels), resized nearest to its
    side: bool [N, R, R]; normal images are empty."""
    (f0, f1), res = frame
    out = np.zeros((len(rows), res, res), dtype=bool)
    for i, row in enumerate(rows):
        if not row.mask:
            continue
        m = load_mask(row.mask, None)
        (h, w) = m.shape
        m = m[round(f0 * h) : round(f1 * h), round(f0 * w) : round(f1 * w)]
        if m.shape != (res, res):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((res, res), Image.NEAREST)) > 127
        out[i] = m
    return out
