"""MuSc maths (Li et al., ICLR 2024): zero-shot mutual scoring of unlabeled images.

* LNAMD: patch descriptors aggregated over r x r neighbourhoods for several r (the caller builds one grid per r);
* MSM: a patch of image i gets, for every other image j, the distance to its nearest patch in j; these N - 1
  distances are sorted and the lowest `topmin` share is averaged (normal patches find close matches in most
  images, a defect patch in few or none);
* RsCIN: image scores re-scored by averaging over each image's k most similar images (global features, cosine,
  itself included), averaged over several k.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def nearest_per_image(query: torch.Tensor, others: torch.Tensor, chunk_images: int = 16) -> torch.Tensor:
    """Distance of each query patch to its nearest patch in each other image.

    query [P, D], others [M, Q, D] -> [P, M] (Euclidean; matrix products with the norm trick, blocked over images).
    """
    q = query.float()
    q_sq = (q * q).sum(1, keepdim=True)  # [P, 1]
    out = []
    for s in range(0, others.shape[0], chunk_images):
        o = others[s : s + chunk_images].float()  # [m, Q, D]
        d2 = q_sq[:, None] + (o * o).sum(-1)[None] - 2.0 * torch.einsum("pd,mqd->pmq", q, o)  # [P, m, Q]
        out.append(d2.amin(-1).clamp_min(0).sqrt())
    return torch.cat(out, dim=1)


def interval_mean(dist: torch.Tensor, topmin: float) -> torch.Tensor:
    """[..., M] -> [...]: mean of the smallest max(1, round(topmin * M)) values."""
    k = max(1, int(round(topmin * dist.shape[-1])))
    return dist.topk(k, dim=-1, largest=False).values.mean(-1)


def mutual_scores(grid: torch.Tensor, topmin: float = 0.3, chunk_images: int = 16) -> torch.Tensor:
    """MSM over a pool of unlabeled images: grid [N, h, w, D] (N >= 2) -> patch scores [N, h, w]."""
    n, h, w, d = grid.shape
    if n < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {n}")
    flat = grid.reshape(n, h * w, d)
    out = []
    for i in range(n):
        others = torch.cat([flat[:i], flat[i + 1 :]])  # [N-1, P, D]
        out.append(interval_mean(nearest_per_image(flat[i], others, chunk_images), topmin).reshape(h, w))
    return torch.stack(out)


def rescore(scores: torch.Tensor, global_feats: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """RsCIN: scores [N], global features [N, E] -> mean over k in `ks` of the mean score of each image's k most
    similar images (cosine, itself included; k capped at N). Empty `ks` returns the scores unchanged."""
    if not ks:
        return scores
    g = F.normalize(global_feats.float(), dim=-1)
    order = (g @ g.T).argsort(dim=1, descending=True, stable=True)  # [N, N]; itself first (cos 1)
    n = scores.shape[0]
    return torch.stack([scores[order[:, : min(k, n)]].mean(1) for k in ks]).mean(0)
