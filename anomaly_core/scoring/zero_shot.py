"""Zero-shot CLIP: patch-to-text similarity at every level against the prompt-ensemble anchors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anomaly_core.scoring.maps import mix_image_score, to_image_maps


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
