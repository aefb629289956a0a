"""Anomaly score fusion (method `fusion`): a CLIP branch and a visual (CNN / kNN) branch, mixed by one alpha.

Protocol (nothing is chosen on test):

1. Per category and per branch, image scores and pixel maps are standardised with statistics of the
   VALIDATION split only: image scores by the mean / std of the val image scores, maps by the mean / std
   of all val map pixels. The statistics are label-free (normal and anomalous val images alike).
2. ``fused = alpha * clip + (1 - alpha) * visual`` for image scores and maps alike, with ONE alpha shared
   by all categories (a per-category alpha over-fits the few val images of a category).
3. alpha is swept over a grid on val; the metric is the unweighted mean over categories (MVTec AD / VisA
   convention). The grid always contains 0 and 1 (they are added when missing), so the fused val metric
   is by construction >= the val metric of either branch alone.
4. Ties (values equal within 1e-12) go to the alpha closest to 0.5 (the most even mix); a remaining tie
   (e.g. 0.4 vs 0.6) goes to the smaller alpha.
5. Test scores are fused with the val statistics and the val-chosen alpha.

Types: ``Scores = {category: (ids, image [N], maps [N, S, S])}`` (see ``anomaly_core.store``),
``Truth = {category: (ids, labels [N] int 0/1, masks [N, S, S] bool)}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from anomaly_core.config import Checks
from anomaly_core.errors import ConfigError, DataError
from anomaly_core.store import check_finite

__all__ = [
    "FusionConfig", "METRICS", "normalise_stats", "apply_norm", "mix", "val_metric", "sweep_alpha",
    "best_on_grid", "with_endpoints", "check_finite", "constant_parts", "select_clip_method", "fuse_scores", "fusion_model", "apply_fusion_model",
]

Scores = dict[str, tuple[list[str], torch.Tensor, torch.Tensor]]
Truth = dict[str, tuple[list[str], np.ndarray, np.ndarray]]
Metric = Literal["image_auroc", "image_ap", "pixel_auroc", "pixel_aupro", "mean"]
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro", "mean")
TIE_TOL = 1e-12
TIE_RULE = "ties (within 1e-12) go to the alpha closest to 0.5, then to the smaller alpha"
CONSTANT_RTOL = 1e-6  # a branch whose val std is below this share of |mean| is constant (z = 0)
CONSTANT_RULE = ("a branch constant on a category's val split (std <= 1e-6 |mean|) gets z = 0 there: it cannot rank, "
                 "so the other branch decides (no std floor)")


def _default_alphas() -> list[float]:
    return [round(0.1 * i, 1) for i in range(11)]


@dataclass
class FusionConfig:
    """params.yaml section `fusion`.

    clip_method: a CLIP-branch method name, or ``auto`` = the best on val among a preference list the caller
        gives (``select_clip_method``).
    visual_method: the visual-branch method (``knn``).
    alphas: the alpha grid in [0, 1]; 0 and 1 are always added.
    metric: what alpha (and ``auto``) is chosen by on val; ``mean`` = mean of image_auroc and pixel_auroc.
    max_fpr: AUPRO integration limit.
    max_pixels: subsample size for pixel AUROC during the sweep (None = all pixels; AUPRO is always exact).
    """

    clip_method: str = "auto"
    visual_method: str = "knn"
    alphas: list[float] = field(default_factory=_default_alphas)
    metric: Metric = "image_auroc"
    max_fpr: float = 0.3
    max_pixels: int | None = None

    def validate(self, section: str) -> None:
        Checks(section).alphas("alphas", self.alphas).open_unit(max_fpr=self.max_fpr) \
            .that(self.max_pixels is None or self.max_pixels > 0, "max_pixels", self.max_pixels, "null or > 0").done()


def val_truth(rows, size: int) -> Truth:
    """Ground truth of the given (val) manifest rows: {category: (ids, labels [N], masks [N, S, S])}."""
    from anomaly_core.data.manifest import categories
    from anomaly_core.evaluation import masks_for

    out = {}
    for cat in categories(rows):
        part = [r for r in rows if r.category == cat]
        out[cat] = ([r.id for r in part], np.array([r.label for r in part]), masks_for(part, size))
    return out


# --------------------------------------------------------------------------- normalisation


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of all elements as floats. A constant input (std <= CONSTANT_RTOL * |mean|, float32 rounding
    noise included) gets std 0: `apply_norm` then maps that branch to z = 0 everywhere."""
    x = x.double()
    mean, std = float(x.mean()), float(x.std(unbiased=False))
    return mean, (0.0 if std <= CONSTANT_RTOL * abs(mean) else std)


def normalise_stats(val_scores: Scores) -> dict[str, dict[str, tuple[float, float]]]:
    """Per category: ``{"image": (mean, std) of val image scores [N], "map": (mean, std) of val map pixels}``."""
    return {cat: {"image": _mean_std(image), "map": _mean_std(maps)} for cat, (_, image, maps) in val_scores.items()}


def constant_parts(stats: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """``category.image`` / ``category.map`` entries whose val values are constant (std 0, z = 0)."""
    return [f"{cat}.{k}" for cat, per in sorted(stats.items()) for k, (_, sd) in per.items() if sd == 0.0]


def _z(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(x - mean) / std in float64 -> float32; std 0 (a branch constant on val) -> zeros: it carries no ranking
    information on val, so it adds nothing and the other branch decides (documented constant-branch rule)."""
    if std == 0.0:
        return torch.zeros_like(x, dtype=torch.float32)
    return ((x.double() - mean) / std).float()


def apply_norm(scores: Scores, stats: dict[str, dict[str, tuple[float, float]]]) -> Scores:
    """Standardise every category of ``scores`` (any split) with val ``stats``; float32 out."""
    missing = sorted(set(scores) - set(stats))
    if missing:
        raise DataError(f"fusion: no validation statistics for category {missing[0]}")
    out: Scores = {}
    for cat, (ids, image, maps) in scores.items():
        (mi, si), (mm, sm) = stats[cat]["image"], stats[cat]["map"]
        out[cat] = (list(ids), _z(image, mi, si), _z(maps, mm, sm))
    return out


def _reorder(scores: Scores, ids_by_cat: dict[str, Sequence[str]], what: str) -> Scores:
    """``scores`` restricted and reordered to ``ids_by_cat``; every id must be present."""
    out: Scores = {}
    for cat, want in ids_by_cat.items():
        if cat not in scores:
            raise DataError(f"fusion: {what} has no scores for category {cat}; re-run `dvc repro score`")
        ids, image, maps = scores[cat]
        index = {i: n for n, i in enumerate(ids)}
        absent = [i for i in want if i not in index]
        if absent:
            raise DataError(f"fusion: {what} lacks {len(absent)} images of {cat}, e.g. {absent[0]}")
        order = torch.tensor([index[i] for i in want], dtype=torch.long)
        out[cat] = (list(want), image[order], maps[order])
    return out


def mix(clip: Scores, visual: Scores, alpha: float) -> Scores:
    """``alpha * clip + (1 - alpha) * visual`` per category; both already normalised and in the same id order."""
    out: Scores = {}
    for cat, (ids, c_img, c_map) in clip.items():
        _, v_img, v_map = visual[cat]
        out[cat] = (list(ids), alpha * c_img + (1.0 - alpha) * v_img, alpha * c_map + (1.0 - alpha) * v_map)
    return out


# --------------------------------------------------------------------------- validation metric


def _category_metric(metric: str, labels: np.ndarray, masks: np.ndarray, image: np.ndarray, maps: np.ndarray,
                     max_fpr: float, max_pixels: int | None) -> float:
    """One category's value of ``metric`` (labels [N], masks [N,S,S], image [N], maps [N,S,S])."""
    from anomaly_core.metrics import aupro, image_metrics, pixel_metrics  # sklearn: the stages that measure

    if metric in ("image_auroc", "image_ap"):
        return image_metrics(labels, image)[metric]
    if metric == "pixel_aupro":
        return aupro(masks, maps, max_fpr=max_fpr)
    if metric == "pixel_auroc":
        return pixel_metrics(masks, maps, max_fpr=max_fpr, max_pixels=max_pixels)["pixel_auroc"]
    if metric == "mean":
        return 0.5 * (image_metrics(labels, image)["image_auroc"]
                      + pixel_metrics(masks, maps, max_fpr=max_fpr, max_pixels=max_pixels)["pixel_auroc"])
    raise ConfigError(f"fusion.metric={metric!r}: must be one of {list(METRICS)}")


def val_metric(truth: Truth, scores: Scores, metric: str, max_fpr: float = 0.3,
               max_pixels: int | None = None, what: str = "scores") -> float:
    """Unweighted mean of ``metric`` over EVERY category of ``truth`` (never over fewer: a category where it is
    not computable is an error, as are NaN/inf scores). ``scores`` must be in the id order of ``truth``;
    ``what`` names the method in errors."""
    if metric not in ("image_auroc", "image_ap") and not any(np.asarray(t[2]).any() for t in truth.values()):
        raise DataError(f"fusion.metric={metric}: the val split has no defect pixel (a dataset without masks?); "
                        "use image_auroc or image_ap")
    check_finite({c: scores[c] for c in truth}, what)
    values = []
    for cat, (_, labels, masks) in truth.items():
        labels, masks = np.asarray(labels), np.asarray(masks)
        if labels.min() == labels.max():
            raise DataError(f"{what}: {metric} is not computable on the selection rows of category {cat} (only "
                            f"{'anomalous' if labels.min() else 'normal'} images); raise data.val_fraction")
        if metric not in ("image_auroc", "image_ap") and not masks.any():
            raise DataError(f"{what}: {metric} is not computable on category {cat}: its selection rows have no "
                            "defect pixel (empty masks); use image_auroc or image_ap")
        _, image, maps = scores[cat]
        values.append(_category_metric(metric, labels, masks, image.numpy(), maps.numpy(), max_fpr, max_pixels))
    return float(np.mean(values))


# --------------------------------------------------------------------------- alpha sweep


def with_endpoints(grid: Sequence[float]) -> list[float]:
    """Sorted unique grid with 0.0 and 1.0 added (so the fusion can always fall back to one branch)."""
    if any(not 0.0 <= float(a) <= 1.0 for a in grid):
        raise ConfigError(f"alphas={list(grid)}: values must be in [0, 1]")
    return sorted({round(float(a), 10) for a in grid} | {0.0, 1.0})


def best_on_grid(curve: Sequence[tuple[float, float]]) -> float:
    """The alpha of the highest value on ``curve`` [(alpha, value)]; ties per ``TIE_RULE``."""
    top = max(v for _, v in curve)
    tied = [a for a, v in curve if v >= top - TIE_TOL]
    return min(tied, key=lambda a: (abs(a - 0.5), a))


def sweep_alpha(clip_val: Scores, visual_val: Scores, truth: Truth, grid: Sequence[float], metric: str,
                max_fpr: float = 0.3, max_pixels: int | None = None) -> tuple[float, list[tuple[float, float]]]:
    """Sweep alpha on val: (best alpha, curve [(alpha, metric value)]).

    ``clip_val`` / ``visual_val``: NORMALISED val Scores in the id order of ``truth``. ``grid`` gets 0 and 1 added.
    """
    curve = []
    for alpha in with_endpoints(grid):
        value = val_metric(truth, mix(clip_val, visual_val, alpha), metric, max_fpr, max_pixels, "fusion")
        curve.append((alpha, value))
    return best_on_grid(curve), curve


# --------------------------------------------------------------------------- method choice + full fusion


def _truth_ids(truth: Truth) -> dict[str, list[str]]:
    return {cat: list(ids) for cat, (ids, _, _) in truth.items()}


def select_clip_method(cfg: FusionConfig, candidates: dict[str, Scores], truth: Truth,
                       preference: Sequence[str]) -> tuple[str, dict[str, float]]:
    """Resolve ``cfg.clip_method``: (method, {method: val metric}).

    ``candidates``: val Scores of the CLIP-branch methods that exist. With ``auto``, the methods of
    ``preference`` present in ``candidates`` are scored on val with ``cfg.metric`` and the best wins (ties: the
    earlier in ``preference``). A named method must be among ``candidates``.
    """
    if cfg.clip_method != "auto":
        if cfg.clip_method not in candidates:
            raise DataError(f"fusion.clip_method={cfg.clip_method}: no scores for it (have {sorted(candidates)})")
        return cfg.clip_method, {}
    names = [m for m in preference if m in candidates]
    if not names:
        raise DataError(f"fusion.clip_method=auto: none of {list(preference)} has scores")
    ids = _truth_ids(truth)
    values = {m: val_metric(truth, _reorder(candidates[m], ids, m), cfg.metric, cfg.max_fpr, cfg.max_pixels, m)
              for m in names}
    best = max(values.values())
    return next(m for m in names if values[m] >= best - TIE_TOL), values


def fuse_scores(clip: dict[str, Scores], visual: dict[str, Scores], truth: Truth, cfg: FusionConfig,
                clip_name: str | None = None) -> tuple[dict[str, Scores], dict]:
    """Fuse two branches. ``clip`` / ``visual``: {split: Scores} with at least ``val`` (and usually ``test``).

    ``truth``: val ground truth; val Scores are aligned to its ids, other splits to the clip branch's ids.
    Returns ({split: fused Scores}, report) with report keys: ``alpha``, ``metric``, ``grid``, ``curve``
    [[alpha, value]], ``val`` {clip, visual, fusion}, ``branches``, ``constant_on_val``, ``constant_rule``,
    ``tie_rule``, ``note``. NaN/inf scores of either branch stop it (DataError naming the branch and category).
    """
    if "val" not in clip or "val" not in visual:
        raise DataError("fusion: both branches need val scores")
    ids = _truth_ids(truth)
    for split in clip:
        check_finite(clip[split], f"{clip_name or cfg.clip_method} (clip branch, {split})")
    for split in visual:
        check_finite(visual[split], f"{cfg.visual_method} (visual branch, {split})")
    stats_c = normalise_stats(_reorder(clip["val"], ids, "clip branch"))
    stats_v = normalise_stats(_reorder(visual["val"], ids, "visual branch"))
    norm = {}
    for split in clip:
        if split not in visual:
            raise DataError(f"fusion: the visual branch has no {split} scores")
        order = ids if split == "val" else {c: list(s[0]) for c, s in clip[split].items()}
        norm[split] = (apply_norm(_reorder(clip[split], order, "clip branch"), stats_c),
                       apply_norm(_reorder(visual[split], order, "visual branch"), stats_v))
    grid = with_endpoints(cfg.alphas)
    alpha, curve = sweep_alpha(*norm["val"], truth, grid, cfg.metric, cfg.max_fpr, cfg.max_pixels)
    by_alpha = dict(curve)
    fused = {split: mix(c, v, alpha) for split, (c, v) in norm.items()}
    report = {
        "alpha": alpha,
        "metric": cfg.metric,
        "grid": grid,
        "grid_endpoints_added": sorted({0.0, 1.0} - {float(a) for a in cfg.alphas}),
        "curve": [[a, v] for a, v in curve],
        "val": {"clip": by_alpha[1.0], "visual": by_alpha[0.0], "fusion": by_alpha[alpha]},
        "branches": {"clip": clip_name or cfg.clip_method, "visual": cfg.visual_method},
        "constant_on_val": {"clip": constant_parts(stats_c), "visual": constant_parts(stats_v)},
        "constant_rule": CONSTANT_RULE,
        "tie_rule": TIE_RULE,
        "note": "scores standardised per category and branch with val statistics; alpha chosen on val "
                "(mean over categories); test fused with the val statistics and alpha",
        "stats": {"clip": stats_c, "visual": stats_v},  # the stage moves these to the fusion model file
    }
    return fused, report


def fusion_model(report: dict) -> dict:
    """What scoring a NEW image with the fusion needs (`data/fused/fusion/model.json`, read by `export`): the two
    branches' methods, alpha and the per-category val standardisation statistics {branch: {category: {"image":
    [mean, std], "map": [mean, std]}}} (full precision)."""
    return {"clip_method": report["branches"]["clip"], "visual_method": report["branches"]["visual"],
            "alpha": float(report["alpha"]),
            "stats": {b: {c: {k: [float(v[0]), float(v[1])] for k, v in s.items()} for c, s in per.items()}
                      for b, per in report["stats"].items()}}


def apply_fusion_model(model: dict, category: str, clip: tuple[torch.Tensor, torch.Tensor],
                       visual: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse one category's (image [N], maps [N, S, S]) of both branches as `fuse_scores` fuses test scores: each
    branch standardised with its val statistics, then `alpha * clip + (1 - alpha) * visual`. Maps go through the
    float16 round-trip of the score files the stage fuses (`store.save_scores`)."""
    def norm(branch: str, image: torch.Tensor, maps: torch.Tensor) -> Scores:
        stats = {category: {k: tuple(v) for k, v in model["stats"][branch][category].items()}}
        return apply_norm({category: ([], image.float(), maps.half().float())}, stats)

    fused = mix(norm("clip", *clip), norm("visual", *visual), float(model["alpha"]))[category]
    return fused[1], fused[2]
