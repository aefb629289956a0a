"""Image- and pixel-level anomaly detection metrics (MVTec AD protocol).

Conventions: label / mask value 1 (True) = anomalous, higher score = more anomalous.
A pixel or image is "predicted anomalous" at threshold ``t`` when ``score >= t``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix_at_thresholds,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

__all__ = ["image_metrics", "pixel_metrics", "auroc_ap", "aupro", "roc_pr_curves"]

# 8-connectivity structuring element for connected components of ground-truth masks.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)
# Pixels per chunk when streaming normal pixels in `aupro` (bounds temporary memory).
_CHUNK_PIXELS = 1 << 22


# --------------------------------------------------------------------------- helpers


def _check_binary(labels: np.ndarray, what: str) -> None:
    """Raise ValueError naming the missing class if ``labels`` lacks class 0 or class 1."""
    has_pos = bool(np.any(labels))
    has_neg = bool(labels.size) and not bool(np.all(labels))
    if has_pos and has_neg:
        return
    if not has_pos and not has_neg:
        raise ValueError(f"{what}: no samples, metric not computable")
    missing = "anomalous (1)" if not has_pos else "normal (0)"
    raise ValueError(f"{what}: only one class present, no {missing} samples; metric not computable")


def _as_labels_scores(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``labels`` bool [N] and ``scores`` float64 [N]."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{what}: labels {y.shape} and scores {s.shape} differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what}: scores contain NaN or inf")
    y = y.astype(bool)
    _check_binary(y, what)
    return y, s


def _f1max(y: np.ndarray, s: np.ndarray) -> float:
    """Maximum F1 over all thresholds of the precision-recall curve. y bool [N], s float [N]."""
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def _downsample_idx(n: int, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` evenly spread points of ``n``, always keeping first and last."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(max_points, 2)).round().astype(np.int64))


def _as_masks_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``masks`` bool [N, H, W] and ``maps`` float [N, H, W] (2-D inputs become N=1)."""
    m = np.asarray(masks).astype(bool, copy=False)
    a = np.asarray(maps)
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3 or m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and maps {a.shape} must both be [N, H, W]")
    return m, a


# --------------------------------------------------------------------------- image level


def image_metrics(labels, scores) -> dict:
    """Image-level AUROC, AP and F1-max.

    Args:
        labels: int [N], 0 normal / 1 anomalous.
        scores: float [N], image anomaly score.

    Returns:
        ``{"image_auroc", "image_ap", "image_f1max"}`` as floats.

    Raises:
        ValueError: if only one class is present (message names the missing class) or scores are not finite.
    """
    y, s = _as_labels_scores(labels, scores, "image metrics")
    return {
        "image_auroc": float(roc_auc_score(y, s)),
        "image_ap": float(average_precision_score(y, s)),
        "image_f1max": _f1max(y, s),
    }


def roc_pr_curves(labels, scores, max_points: int = 200) -> dict:
    """Downsampled ROC and PR curves for plotting.

    Args:
        labels: int [N] (0/1); scores: float [N]; max_points: max points per curve (first/last kept).

    Returns:
        ``{"fpr": [...], "tpr": [...], "recall": [...], "precision": [...]}`` — lists of floats,
        ROC ordered by increasing FPR, PR ordered by decreasing recall (sklearn order).
    """
    y, s = _as_labels_scores(labels, scores, "ROC/PR curves")
    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)
    i_roc = _downsample_idx(len(fpr), max_points)
    i_pr = _downsample_idx(len(recall), max_points)
    return {
        "fpr": fpr[i_roc].tolist(),
        "tpr": tpr[i_roc].tolist(),
        "recall": recall[i_pr].tolist(),
        "precision": precision[i_pr].tolist(),
    }


# --------------------------------------------------------------------------- pixel level


def pixel_metrics(masks, maps, max_fpr: float = 0.3, max_pixels: int | None = None, seed: int = 0) -> dict:
    """Pixel-level AUROC, AP and AUPRO.

    Args:
        masks: bool [N, H, W] ground truth (True = defect pixel).
        maps: float [N, H, W] anomaly maps, same shape.
        max_fpr: FPR integration limit for AUPRO.
        max_pixels: if set and the number of pixels exceeds it, AUROC/AP use a deterministic uniform
            random subsample of this many pixels (``seed``); AUPRO always uses all pixels (it is exact and fast).
        seed: subsample seed.

    Returns:
        ``{"pixel_auroc", "pixel_ap", "pixel_aupro"}`` as floats.

    Raises:
        ValueError: if there is no defect pixel or no normal pixel.
    """
    m, a = _as_masks_maps(masks, maps)
    y, s = m.reshape(-1), a.reshape(-1)  # [N*H*W]
    _check_binary(y, "pixel metrics")
    if max_pixels is not None and y.size > max_pixels:
        idx = np.sort(np.random.default_rng(seed).choice(y.size, size=int(max_pixels), replace=False))
        y, s = y[idx], s[idx]
    y, s = _as_labels_scores(y, s, "pixel metrics (subsample)")
    auroc, ap = auroc_ap(y, s)
    return {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_aupro": aupro(m, a, max_fpr=max_fpr)}


def auroc_ap(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(ROC AUC, average precision) of labels bool [N] and scores [N] from ONE sort: scikit-learn's
    `confusion_matrix_at_thresholds` gives the counts at every distinct score; the areas are then summed as
    `roc_auc_score` (trapezoids under the ROC) and `average_precision_score` (sum of precision x recall steps)
    sum them. Pixel metrics sort millions of scores, and the two sklearn calls sort them twice."""
    _, fps, _, tps, _ = confusion_matrix_at_thresholds(y, s)  # thresholds decreasing, counts increasing
    tpr = np.concatenate([[0.0], tps / tps[-1]])
    fpr = np.concatenate([[0.0], fps / fps[-1]])
    precision = tps / (tps + fps)  # > 0 samples at every threshold
    return float(np.trapezoid(tpr, fpr)), float(np.sum(np.diff(tpr) * precision))


# --------------------------------------------------------------------------- AUPRO


def _defect_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and PRO weights of all defect pixels.

    Regions are 8-connected components of each image's mask. Each defect pixel of region r gets weight
    ``1 / (|r| * R)`` (R = total number of regions), so the summed weight of pixels above a threshold
    is the PRO (mean per-region overlap) at that threshold.

    Returns:
        scores float64 [P], weights float64 [P] (P = number of defect pixels).
    """
    scores, region_ids, offset = [], [], 0
    for mask, amap in zip(masks, maps):
        if not mask.any():
            continue
        lab, n = ndimage.label(mask, structure=_STRUCTURE_8)  # [H, W] int, 0 = background
        scores.append(amap[mask].astype(np.float64))
        region_ids.append(lab[mask] - 1 + offset)
        offset += n
    if offset == 0:
        raise ValueError("AUPRO: no defect region in any ground-truth mask; metric not computable")
    ids = np.concatenate(region_ids)
    sizes = np.bincount(ids, minlength=offset)  # [R]
    return np.concatenate(scores), 1.0 / (sizes[ids] * float(offset))


def _quantizer(masks: np.ndarray, maps: np.ndarray, num_thresholds: int | None):
    """Return a function mapping scores to the largest threshold <= score (identity when exact)."""
    if num_thresholds is None:
        return lambda x: x
    lo, hi = float(maps.min()), float(maps.max())
    thr = np.linspace(lo, hi, int(num_thresholds))  # [K]
    return lambda x: thr[np.maximum(np.searchsorted(thr, x, side="right") - 1, 0)]


def _sort_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype to sort scores in: float32/float64 as is (fast SIMD sort), anything else via float64/float32."""
    if dtype in (np.float32, np.float64):
        return dtype
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(np.float64)


def _normal_counts(masks, maps, u: np.ndarray, quantize) -> tuple[np.ndarray, np.ndarray, int]:
    """Count normal pixels relative to the sorted unique defect scores ``u`` [M].

    Streams over image chunks: each chunk's normal scores are sorted (exact float->float64 casts and the
    quantizer are monotone, so the order is kept) and ``u`` is looked up in them.

    Returns:
        ``ge`` int [M]: # normal pixels with score >= u[k];
        ``gt`` int [M]: # normal pixels with score >  u[k];
        ``n_normal``: total # normal pixels.
    """
    ge = np.zeros(len(u), dtype=np.int64)
    gt = np.zeros(len(u), dtype=np.int64)
    n_normal = 0
    step = max(1, _CHUNK_PIXELS // max(1, masks[0].size))
    dtype = _sort_dtype(maps.dtype)
    for start in range(0, len(masks), step):
        mk, mp = masks[start : start + step], maps[start : start + step]
        s = quantize(np.sort(mp[~mk].astype(dtype, copy=False)).astype(np.float64))  # [n] ascending
        ge += len(s) - np.searchsorted(s, u, side="left")
        gt += len(s) - np.searchsorted(s, u, side="right")
        n_normal += len(s)
    return ge, gt, n_normal


def _pro_curve(masks, maps, num_thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO-vs-FPR curve (FPR [K], PRO [K], both non-decreasing, from (0, 0) to (1, 1)).

    Only thresholds equal to a defect-pixel score can change the PRO; between two of them the curve is a
    horizontal segment. So the exact (piecewise-linear, ties as diagonal segments) curve is given by two
    points per unique defect score d: just above d (``score > d``) and at d (``score >= d``).
    """
    quantize = _quantizer(masks, maps, num_thresholds)
    d_scores, d_weights = _defect_pixels(masks, maps)
    u, inv = np.unique(quantize(d_scores), return_inverse=True)  # u [M] ascending
    w = np.bincount(inv.reshape(-1), weights=d_weights, minlength=len(u))  # [M] PRO mass per unique score
    pro_ge = np.minimum(np.cumsum(w[::-1])[::-1], 1.0)
    pro_gt = pro_ge - w
    ge, gt, n_normal = _normal_counts(masks, maps, u, quantize)
    if n_normal == 0:
        raise ValueError("AUPRO: no defect-free pixel; FPR not computable")
    # Interleave (gt, ge) per unique score, in descending score order.
    fpr = np.stack([gt, ge], axis=1)[::-1].reshape(-1) / n_normal
    pro = np.stack([pro_gt, pro_ge], axis=1)[::-1].reshape(-1)
    fpr = np.concatenate([[0.0], fpr, [1.0]])
    pro = np.concatenate([[0.0], np.maximum(pro, 0.0), [1.0]])
    return fpr, pro


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve (x non-decreasing) from x[0] to ``x_max`` (interpolated)."""
    k = int(np.searchsorted(x, x_max, side="right"))  # points x[:k] <= x_max
    xs, ys = x[:k], y[:k]
    if k < len(x):
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_end)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(masks, maps, max_fpr: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``max_fpr`` (MVTec AD protocol).

    Regions: 8-connected components of each ground-truth mask. At threshold t, a region's overlap is the
    fraction of its pixels with ``score >= t``; PRO(t) is the mean overlap over all regions of all images;
    FPR(t) is the fraction of all defect-free pixels (of all images, normal ones included) with
    ``score >= t``. The PRO-vs-FPR curve is integrated with the trapezoid rule from FPR 0 to ``max_fpr``
    (interpolated at exactly ``max_fpr``) and divided by ``max_fpr``.

    The computation is exact over all unique scores (sort/bincount based, no loop over thresholds); the
    cost is O(N·H·W·log(chunk) + chunks·M·log(chunk)) for M unique defect scores, streamed over image chunks.

    Args:
        masks: bool [N, H, W] ground truth.
        maps: float [N, H, W] anomaly maps (any float dtype; compared in float64).
        max_fpr: integration limit in (0, 1].
        num_thresholds: None for the exact curve; an int K evaluates the curve only at
            ``np.linspace(maps.min(), maps.max(), K)`` (plus the (0, 0) and (1, 1) end points).

    Returns:
        AUPRO in [0, 1].

    Raises:
        ValueError: no defect region, no defect-free pixel, bad ``max_fpr`` or non-finite maps.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"AUPRO: max_fpr must be in (0, 1], got {max_fpr}")
    m, a = _as_masks_maps(masks, maps)
    if not np.all(np.isfinite(a)):
        raise ValueError("AUPRO: maps contain NaN or inf")
    fpr, pro = _pro_curve(m, a, num_thresholds)
    return _trapezoid_to(fpr, pro, max_fpr) / max_fpr
