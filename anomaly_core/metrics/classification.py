"""Multi-class classification metrics (e.g. zero-shot defect-type classification)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

__all__ = ["classification_metrics"]


def _top_k(y: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Top-k accuracy over all C classes. y int [N], probs float [N, C].

    k >= C is trivially 1.0. For C == 2 sklearn switches to a thresholded binary mode (0.5 or 0 on the
    positive-class score) which differs from argmax for unnormalised scores, so top-1 is the argmax hit rate.
    """
    n_classes = probs.shape[1]
    if k >= n_classes:
        return 1.0
    if n_classes == 2:
        return float(np.mean(probs.argmax(axis=1) == y))
    return float(top_k_accuracy_score(y, probs, k=k, labels=np.arange(n_classes)))


def classification_metrics(y_true, probs, labels=None) -> dict:
    """Top-1 / top-5 accuracy, balanced accuracy and macro F1.

    Args:
        y_true: int [N] true class indices in ``[0, C)``.
        probs: float [N, C] class probabilities (or any scores; argmax = prediction).
        labels: optional class indices over which macro F1 is averaged; default (None) = classes present
            in ``y_true`` or in the predictions (sklearn's default). Top-k always ranks all C classes.

    Returns:
        ``{"top1", "top5", "balanced_acc", "macro_f1"}`` as floats; ``top5`` uses k = min(5, C).

    Raises:
        ValueError: on shape mismatch, fewer than 2 classes, or labels outside ``[0, C)``.
    """
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or y.size == 0:
        raise ValueError(f"classification metrics: y_true {y.shape} and probs {p.shape} must be [N] and [N, C]")
    n_classes = p.shape[1]
    if n_classes < 2:
        raise ValueError("classification metrics: need at least 2 classes")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"classification metrics: y_true values outside [0, {n_classes})")
    y_pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" is expected for imbalanced evaluation sets.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y, y_pred)
    return {
        "top1": _top_k(y, p, 1),
        "top5": _top_k(y, p, min(5, n_classes)),
        "balanced_acc": float(balanced),
        "macro_f1": float(f1_score(y, y_pred, labels=labels, average="macro", zero_division=0)),
    }
