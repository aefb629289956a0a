"""CLIP anchor scoring: patch-to-text similarity at every level against one (normal, abnormal) anchor pair per
category: the zero-shot rule, shared by the zero-shot prompt ensemble and CoOp's learned prompts."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from anomaly_core.data.manifest import Row
from anomaly_core.kit.maps import mix_image_score, to_image_maps
from anomaly_core.kit.scores import Scores, score_splits
from anomaly_core.store import FeatureStore

__all__ = ["anomaly_probs", "zero_shot_scores", "clip_anchor_scores"]


def anomaly_probs(tokens: torch.Tensor, anchors: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """tokens [N, L, E], anchors [2, E] (normal, abnormal; normalised) -> abnormal probability [N, L]."""
    logits = F.normalize(tokens.float(), dim=-1) @ anchors.float().T / temperature  # [N, L, 2]
    return logits.softmax(-1)[..., 1]


def zero_shot_scores(levels: list[torch.Tensor], global_emb: torch.Tensor, anchors: torch.Tensor, grid: int,
                     size: int, sigma: float, image_weight: float, temperature: float = 0.01
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level maps averaged, smoothed, upsampled; image score mixes the global-embedding probability
    with the map maximum: `image_weight * p_global + (1 - image_weight) * max(map)`.

    levels: [N, L, E] each; global_emb [N, E] -> (image scores [N], maps [N, size, size]).
    """
    n = global_emb.shape[0]
    per_level = [anomaly_probs(t, anchors, temperature).reshape(n, grid, grid) for t in levels]
    maps = to_image_maps(torch.stack(per_level).mean(0), size, sigma)
    p_global = anomaly_probs(global_emb[:, None], anchors, temperature)[:, 0]
    return mix_image_score(p_global, maps, image_weight), maps


def clip_anchor_scores(store: FeatureStore, rows: Sequence[Row], anchors: dict[str, torch.Tensor], sigma: float,
                       image_weight: float, temperature: float, size: int) -> Scores:
    """Scores from cached CLIP tokens against one (normal, abnormal) anchor pair per category [2, E]: the
    zero-shot CLIP rule, shared by zero-shot prompts and CoOp's learned prompts."""
    grid = store.info["clip"]["grid"]

    def part(cat: str, rows_: list[Row]):
        feats = store.get("clip", rows_)
        return zero_shot_scores(store.levels(feats), feats["global"], anchors[cat], grid, size, sigma,
                                image_weight, temperature)

    return score_splits(rows, part)
