"""CLIP training data of the prompt / prototype learners (multi-prototype, CoOp): cached tokens of the k-shot
normals (every patch of every level) and of val anomalies (grid cells by mask coverage)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from anomaly_core.data.manifest import Row
from anomaly_core.evaluation import masks_for
from anomaly_core.kit.patches import clip_grid
from anomaly_core.store import FeatureStore

__all__ = ["ClipTrainData", "grid_coverage", "clip_train_data", "resample"]


@dataclass
class ClipTrainData:
    """Cached CLIP tokens of one category, flattened over images and levels."""

    normal_patches: torch.Tensor    # [Pn, E] shots first (their count is n_shot_patches), then clean cells
    abnormal_patches: torch.Tensor  # [Pa, E] grid cells of anomalous images with mask coverage >= min_coverage
    normal_globals: torch.Tensor    # [Gn, E]
    abnormal_globals: torch.Tensor  # [Ga, E]
    n_shot_patches: int = 0

    def counts(self) -> dict[str, int]:
        return {"normal_patches": int(self.normal_patches.shape[0]),
                "abnormal_patches": int(self.abnormal_patches.shape[0]),
                "normal_images": int(self.normal_globals.shape[0]),
                "abnormal_images": int(self.abnormal_globals.shape[0])}


def grid_coverage(rows: Sequence[Row], size: int, grid: int) -> torch.Tensor:
    """Share of each grid cell covered by the ground-truth mask: rows -> [N, grid*grid] in [0, 1]
    (row-major, the order of the CLIP patch tokens). Masks are read at `size` then area-averaged."""
    masks = torch.from_numpy(masks_for(rows, size)).float()[:, None]  # [N, 1, S, S]
    return F.adaptive_avg_pool2d(masks, grid).flatten(1)  # [N, g*g]


def clip_train_data(store: FeatureStore, normal_rows: Sequence[Row], anomalous_rows: Sequence[Row], size: int,
                    min_coverage: float = 0.5) -> ClipTrainData:
    """Gather cached CLIP tokens: every patch of every level of `normal_rows` is normal; for
    `anomalous_rows`, cells with coverage >= min_coverage are abnormal, cells with zero coverage normal."""
    feats = store.get("clip", normal_rows)
    levels = store.levels(feats)  # [N, L, E] each
    dim = feats["global"].shape[-1]
    normal = [lvl.reshape(-1, dim) for lvl in levels]
    n_shot = sum(p.shape[0] for p in normal)
    abnormal, ab_glob = [torch.zeros(0, dim)], torch.zeros(0, dim)
    if anomalous_rows:
        afeats = store.get("clip", anomalous_rows)
        cov = grid_coverage(anomalous_rows, size, clip_grid(store))  # [Na, L]
        for lvl in store.levels(afeats):
            abnormal.append(lvl[cov >= min_coverage])
            normal.append(lvl[cov == 0])
        ab_glob = afeats["global"]
    return ClipTrainData(torch.cat(normal), torch.cat(abnormal), feats["global"], ab_glob, n_shot)


def resample(x: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n rows of x [P, E] drawn with replacement (all of x when P <= n); [0, E] stays empty."""
    if x.shape[0] <= n:
        return x
    return x[torch.randint(x.shape[0], (n,), generator=g)]
