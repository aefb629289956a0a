"""Anomaly scoring methods over cached features. Each returns {split: {category: (ids, image [N], maps [N,S,S])}}."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from anomaly_core.config import KnnConfig, ZeroShotConfig
from anomaly_core.data.holdout import shot_rows
from anomaly_core.data.manifest import Row, categories, rows_for
from anomaly_core.scoring.knn import PatchKnn, clip_patches, cnn_patches
from anomaly_core.scoring.maps import image_score_from_map, to_image_maps
from anomaly_core.scoring.zero_shot import zero_shot_scores
from anomaly_core.store import FeatureStore

Scores = dict[str, dict[str, tuple[list[str], torch.Tensor, torch.Tensor]]]
EVAL_SPLITS = ("val", "test")


def patch_grid(store: FeatureStore, branch: str, rows: Sequence[Row], aggregate: int,
               pad: str = "zeros") -> torch.Tensor:
    """Cached features of `rows` -> patch descriptors [N, h, w, D] (`pad`: border of the CNN aggregation)."""
    feats = store.get(branch, rows)
    levels = store.levels(feats)
    if branch == "clip":
        return clip_patches(levels, store.info["clip"]["grid"])
    return cnn_patches(levels, aggregate, pad)


def knn_scores(store: FeatureStore, rows: Sequence[Row], cfg: KnnConfig, size: int, seed: int,
               progress: bool = False, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Scores:
    """Patch kNN against the k-shot normal bank of each category. `transform` maps patch grids
    [N, h, w, D] -> [N, h, w, D'] before the search (used by visual prompt tuning)."""
    out: Scores = {s: {} for s in EVAL_SPLITS}
    for cat in categories(rows):
        bank_grid = patch_grid(store, cfg.branch, shot_rows(rows, cat), cfg.patch_aggregate, cfg.patch_pad)
        if transform is not None:
            bank_grid = transform(bank_grid)
        knn = PatchKnn.fit(bank_grid, cfg, seed)
        for split in EVAL_SPLITS:
            part = rows_for(rows, cat, split)
            grid = patch_grid(store, cfg.branch, part, cfg.patch_aggregate, cfg.patch_pad)
            if transform is not None:
                grid = transform(grid)
            image, maps = knn.predict(grid, size, progress)
            out[split][cat] = ([r.id for r in part], image, maps)
    return out


def zero_shot_clip_scores(store: FeatureStore, rows: Sequence[Row], anchors: dict[str, torch.Tensor],
                          cfg: ZeroShotConfig, size: int) -> Scores:
    """Zero-shot CLIP maps and image scores from cached CLIP tokens; anchors[category] is [2, E]."""
    out: Scores = {s: {} for s in EVAL_SPLITS}
    grid = store.info["clip"]["grid"]
    for cat in categories(rows):
        for split in EVAL_SPLITS:
            part = rows_for(rows, cat, split)
            feats = store.get("clip", part)
            image, maps = zero_shot_scores(store.levels(feats), feats["global"], anchors[cat], grid, size,
                                           cfg.sigma, cfg.image_weight, cfg.temperature)
            out[split][cat] = ([r.id for r in part], image, maps)
    return out
