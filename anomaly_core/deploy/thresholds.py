"""Decision thresholds chosen on the validation split only, and the test metrics at those thresholds.

Modes (`threshold.mode`):

* `f1`: the threshold that maximises F1 on val (scikit-learn's precision-recall curve). A val split without
  anomalies (or without normals) has no F1 curve: the `fpr` rule is used instead, with a warning.
* `fpr`: the smallest threshold whose false-positive rate on the val normals is <= `threshold.fpr`
  (scikit-learn's ROC curve); needs only normal images, so it works when val has no anomalies (warning).
* `fixed`: `threshold.value` as is.

An image (pixel) is predicted anomalous when its score is >= the threshold (the convention of
`anomaly_core.metrics.anomaly`). Pixel thresholds use the same rule on map pixels against the masks; a dataset
without masks has none (`None`, with the reason).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from anomaly_core.config import Checks

__all__ = ["ThresholdConfig", "choose_threshold", "binary_metrics", "category_thresholds", "threshold_metrics"]

Mode = Literal["f1", "fpr", "fixed"]
MAX_PIXELS = 2_000_000  # map pixels used to choose a pixel threshold (evenly strided subsample beyond)


@dataclass
class ThresholdConfig:
    """params.yaml section `threshold`."""

    mode: Mode = "f1"
    fpr: float = 0.05      # target false-positive rate on val normals (mode fpr, and f1's fallback)
    value: float = 0.0     # the threshold of mode fixed (applies to image and pixel scores alike)

    def validate(self, section: str) -> None:
        Checks(section).that(0.0 <= self.fpr < 1.0, "fpr", self.fpr, "must be in [0, 1)").done()


def _fpr_threshold(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Smallest threshold t with FPR(score >= t) <= target on the normals. labels bool [N], scores [N]."""
    from sklearn.metrics import roc_curve  # here, not at import: `validate` reads ThresholdConfig only

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no positives: tpr is undefined, fpr (all we use) is not
        fpr, _, thr = roc_curve(labels.astype(int), scores, drop_intermediate=False)
    ok = np.nonzero(fpr <= target + 1e-12)[0]
    t = float(thr[ok[-1]])
    if not np.isfinite(t):  # target below 1 / n_normals: above every normal score
        t = float(np.nextafter(scores[~labels].max(), np.inf))
    return t


def _f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The val threshold of maximal F1 (ties: the lowest such threshold). labels bool [N], scores [N]."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thr = precision_recall_curve(labels.astype(int), scores)
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thr[int(np.argmax(f1))])


def choose_threshold(labels, scores, mode: Mode, fpr: float = 0.05, value: float = 0.0,
                     what: str = "") -> tuple[float, list[str]]:
    """(threshold, warnings) from val `labels` [N] (1 = anomalous) and `scores` [N].

    `what` names the category / level in warnings. Never raises for a one-class val split.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if mode == "fixed":
        return float(value), []
    if not (~y).any():
        if not y.any():
            raise ValueError(f"{what}: no val scores to choose a threshold on")
        return float(s.min()), [f"{what}: val has no normal images; threshold = lowest val anomaly score"]
    notes = []
    if mode == "f1":
        if y.any():
            return _f1_threshold(y, s), []
        notes.append(f"{what}: val has no anomalies, F1 is undefined; threshold at val FPR {fpr} instead")
    elif not y.any():
        notes.append(f"{what}: val has no anomalies; threshold from the {int((~y).sum())} val normals only")
    return _fpr_threshold(y, s, fpr), notes


def binary_metrics(labels, scores, threshold: float) -> dict[str, float]:
    """Precision, recall, F1, FPR and counts of `score >= threshold` against `labels` [N] (1 = anomalous)."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    pred = np.asarray(scores, dtype=np.float64).reshape(-1) >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "fpr": fp / (fp + tn) if fp + tn else 0.0,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (labels, scores) of masks / maps [N, S, S], evenly strided down to MAX_PIXELS."""
    y, s = np.asarray(masks).reshape(-1), np.asarray(maps).reshape(-1)
    step = max(1, int(np.ceil(y.size / MAX_PIXELS)))
    return y[::step], s[::step]


def category_thresholds(labels, image, masks, maps, cfg: ThresholdConfig, category: str,
                        has_masks: bool) -> dict:
    """One category's thresholds from its VAL split: {"image": t, "pixel": t | None, "warnings": [...]}.

    labels [N], image [N], masks bool [N, S, S], maps [N, S, S]. Without masks the pixel threshold is None.
    """
    t_img, notes = choose_threshold(labels, image, cfg.mode, cfg.fpr, cfg.value, f"{category} image")
    out = {"image": t_img, "pixel": None, "warnings": notes}
    if not has_masks:
        out["pixel_note"] = "no ground-truth masks: no pixel threshold"
        return out
    y, s = _pixels(masks, maps)
    if cfg.mode == "fpr" or y.any():
        out["pixel"], more = choose_threshold(y, s, cfg.mode, cfg.fpr, cfg.value, f"{category} pixel")
        out["warnings"] += more
    else:  # f1 mode without one defect pixel: as for images, fall back to the fpr rule
        out["pixel"], more = choose_threshold(y, s, "fpr", cfg.fpr, cfg.value, f"{category} pixel")
        out["warnings"] += [f"{category} pixel: val masks hold no defect pixel; threshold at val FPR {cfg.fpr}"]
    return out


def threshold_metrics(labels, image, masks, maps, thresholds: dict, has_masks: bool) -> dict:
    """TEST metrics of one category at its val thresholds: {"image": {...}, "pixel": {...}} (pixel only with masks)."""
    out = {"image": {"threshold": thresholds["image"], **binary_metrics(labels, image, thresholds["image"])}}
    if has_masks and thresholds.get("pixel") is not None:
        y, s = np.asarray(masks).reshape(-1), np.asarray(maps).reshape(-1)
        out["pixel"] = {"threshold": thresholds["pixel"], **binary_metrics(y, s, thresholds["pixel"])}
    return out
