"""Tests for anomaly_core.metrics against sklearn and slow, independent reference implementations."""


import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from anomaly_core.metrics import aupro, classification_metrics, image_metrics, pixel_metrics, roc_pr_curves

_trapz = getattr(np, "trapezoid", None) or np.trapz


# --------------------------------------------------------------------------- references


def ref_aupro(masks, maps, thresholds, max_fpr=0.3, structure=np.ones((3, 3))):
    """Slow reference: loop over thresholds, per-region overlaps via ndimage.label, trapezoid to max_fpr."""
    regions = []  # list of (image index, bool [H, W] region mask)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=structure)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]  # threshold +inf
    for t in sorted(thresholds, reverse=True):
        pred = maps >= t
        fprs.append(np.sum(pred & normal) / np.sum(normal))
        pros.append(np.mean([np.sum(pred[i] & r) / np.sum(r) for i, r in regions]))
    fprs, pros = np.array(fprs + [1.0]), np.array(pros + [1.0])
    keep = fprs <= max_fpr
    x = np.append(fprs[keep], max_fpr)
    y = np.append(pros[keep], np.interp(max_fpr, fprs, pros))
    return _trapz(y, x) / max_fpr


def ref_f1max(labels, scores):
    """Brute force: F1 of ``scores >= t`` for every unique score t."""
    return max(f1_score(labels, scores >= t) for t in np.unique(scores))


def make_case(seed=0, n=5, size=32):
    """Masks with several regions per image (incl. diagonal-touching groups) and one fully normal image."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    masks[0, 2:6, 2:8] = True
    masks[0, 20:28, 15:18] = True
    masks[0, 10, 25] = True
    masks[1, 5:9, 5:9] = True  # two groups touching only diagonally -> one 8-connected region
    masks[1, 9:12, 9:14] = True
    masks[1, 25:30, 2:6] = True
    masks[2, 12:22, 12:20] = True
    masks[3, 0:3, 0:3] = True
    masks[3, 29:32, 29:32] = True
    # masks[4] stays fully normal
    smooth = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2))
    maps = smooth + 0.25 * rng.standard_normal(masks.shape)
    return masks, maps


# --------------------------------------------------------------------------- image metrics


def test_image_metrics_match_sklearn_and_bruteforce():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = labels * 0.7 + rng.standard_normal(300)
    scores[:40] = np.round(scores[:40], 1)  # some ties
    out = image_metrics(labels, scores)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out["image_f1max"] == pytest.approx(ref_f1max(labels, scores), abs=1e-12)
    assert 0.5 < out["image_auroc"] < 1.0


@pytest.mark.parametrize("labels,missing", [([0, 0, 0], "anomalous"), ([1, 1], "normal")])
def test_image_metrics_single_class_names_missing(labels, missing):
    with pytest.raises(ValueError, match=missing):
        image_metrics(np.array(labels), np.linspace(0, 1, len(labels)))


def test_roc_pr_curves_downsampled():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1000)
    scores = rng.random(1000) + labels
    c = roc_pr_curves(labels, scores, max_points=50)
    assert 2 <= len(c["fpr"]) == len(c["tpr"]) <= 50
    assert 2 <= len(c["recall"]) == len(c["precision"]) <= 50
    assert c["fpr"][0] == 0.0 and c["fpr"][-1] == 1.0 and c["tpr"][-1] == 1.0
    assert np.all(np.diff(c["fpr"]) >= 0)
    assert _trapz(c["tpr"], c["fpr"]) == pytest.approx(roc_auc_score(labels, scores), abs=0.01)


# --------------------------------------------------------------------------- AUPRO


def test_aupro_perfect_and_worst_and_ties():
    masks, _ = make_case()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, (~masks).astype(float)) == pytest.approx(0.0, abs=1e-12)
    # constant map: the only curve segment is the diagonal (0,0)-(1,1) -> area 0.3^2/2 / 0.3 = 0.15
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15, abs=1e-12)


def _diagonal_case(k_high):
    """One 1-px blob (score 1) touching a 3x3 blob (score 0.5) diagonally; k normal px at 0.7, rest 0."""
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2, 2] = True
    masks[0, 3:6, 3:6] = True
    maps = np.where(masks, 0.5, 0.0)
    maps[0, 2, 2] = 1.0
    normal_idx = np.flatnonzero(~masks.reshape(-1))[:k_high]
    maps.reshape(-1)[normal_idx] = 0.7
    return masks, maps, k_high / np.sum(~masks)


def test_aupro_known_value_and_8_connectivity():
    masks, maps, f = _diagonal_case(k_high=20)
    # 8-connected: one region of 10 px -> curve (0,0) (0,.1) (f,.1) (f,1) (1,1)
    expected_8 = (f * 0.1 + (0.3 - f) * 1.0) / 0.3
    # 4-connected would be two regions (1 px, 9 px) -> PRO 0.5 after the first threshold
    expected_4 = (f * 0.5 + (0.3 - f) * 1.0) / 0.3
    got = aupro(masks, maps)
    assert got == pytest.approx(expected_8, abs=1e-12)
    assert abs(got - expected_4) > 0.1
    thr = np.unique(maps)
    assert ref_aupro(masks, maps, thr) == pytest.approx(expected_8, abs=1e-12)
    assert ref_aupro(masks, maps, thr, structure=None) == pytest.approx(expected_4, abs=1e-12)


def test_aupro_matches_dense_reference():
    masks, maps = make_case()
    got = aupro(masks, maps)
    ref = ref_aupro(masks, maps, np.linspace(maps.min(), maps.max(), 200))
    assert 0.2 < got < 0.95
    assert got == pytest.approx(ref, abs=2e-2)
    # binned mode with the same thresholds reproduces the reference curve exactly
    assert aupro(masks, maps, num_thresholds=200) == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_aupro_exact_with_ties_vs_all_thresholds(max_fpr):
    masks, maps = make_case(seed=3)
    maps = np.round(maps, 1)  # many ties between normal and defect pixels
    exact = ref_aupro(masks, maps, np.unique(maps), max_fpr=max_fpr)
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(exact, abs=1e-9)
    assert aupro(masks, maps.astype(np.float16), max_fpr=max_fpr) == pytest.approx(
        ref_aupro(masks, maps.astype(np.float16).astype(float), np.unique(maps.astype(np.float16)), max_fpr),
        abs=1e-9)


def test_aupro_errors():
    with pytest.raises(ValueError, match="no defect region"):
        aupro(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="defect-free"):
        aupro(np.ones((1, 4, 4), bool), np.random.default_rng(0).random((1, 4, 4)))
    with pytest.raises(ValueError):
        aupro(np.ones((1, 4, 4), bool), np.zeros((1, 4, 5)))


def test_aupro_fast_on_many_maps():
    rng = np.random.default_rng(4)
    masks = np.zeros((200, 128, 128), bool)
    masks[:100, 40:70, 30:90] = True
    maps = (masks * 0.5 + rng.random(masks.shape)).astype(np.float16)
    value = aupro(masks, maps)  # float16 maps, 3.3M pixels: exact and streamed (its speed is in the benchmark)
    assert value == pytest.approx(aupro(masks, maps.astype(np.float64)), abs=1e-12)
    assert 0.0 < value < 1.0


# --------------------------------------------------------------------------- pixel metrics


def test_pixel_metrics_match_sklearn_and_subsample_is_deterministic():
    masks, maps = make_case()
    out = pixel_metrics(masks, maps)
    y, s = masks.reshape(-1), maps.reshape(-1)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert out["pixel_aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    sub1 = pixel_metrics(masks, maps, max_pixels=2000, seed=5)
    sub2 = pixel_metrics(masks, maps, max_pixels=2000, seed=5)
    assert sub1 == sub2
    assert sub1["pixel_auroc"] == pytest.approx(out["pixel_auroc"], abs=0.05)
    assert sub1["pixel_aupro"] == out["pixel_aupro"]


@pytest.mark.parametrize("n, decimals", [(7, 1), (500, 2), (100_000, 3)])
def test_auroc_ap_one_sort_matches_sklearn(n, decimals):
    """Both areas from one confusion_matrix_at_thresholds call equal roc_auc_score / average_precision_score,
    with many tied scores."""
    from anomaly_core.metrics.anomaly import auroc_ap

    rng = np.random.default_rng(n)
    y = rng.random(n) < 0.2
    y[:2] = (True, False)
    s = np.round(rng.random(n) + 0.3 * y, decimals)
    auroc, ap = auroc_ap(y, s)
    assert auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_pixel_metrics_without_defects_raises():
    with pytest.raises(ValueError, match="anomalous"):
        pixel_metrics(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 8)))


# --------------------------------------------------------------------------- classification


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(6)
    n, c = 400, 8
    y = rng.integers(0, c, n)
    logits = rng.standard_normal((n, c))
    logits[np.arange(n), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = classification_metrics(y, probs)
    pred = probs.argmax(1)
    top5 = np.mean([y[i] in np.argsort(-probs[i])[:5] for i in range(n)])
    assert out["top1"] == pytest.approx(np.mean(pred == y), abs=1e-12)
    assert out["top5"] == pytest.approx(top5, abs=1e-12)
    assert out["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert out["top1"] < out["top5"] < 1.0


@pytest.mark.parametrize("c", [2, 3])
def test_classification_top5_with_fewer_than_5_classes(c):
    rng = np.random.default_rng(7)
    y = rng.integers(0, c, 50)
    probs = rng.random((50, c))
    out = classification_metrics(y, probs)
    assert out["top5"] == 1.0  # k = min(5, C) = C covers every class
    assert out["top1"] == pytest.approx(np.mean(probs.argmax(1) == y), abs=1e-12)


def test_classification_metrics_missing_class_in_y_true():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    out = classification_metrics(y, probs)
    assert out["top1"] == pytest.approx(0.75)
    assert out["top5"] == 1.0
    assert out["macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro", zero_division=0))
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 3]), probs[:2])
