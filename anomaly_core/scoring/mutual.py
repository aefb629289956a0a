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
    """MSM over a pool of unlabeled images: grid [N, h, w, D] (N >= 2) -> patch scores [N, h, w].

    Each image pair's distance matrix is computed once and read both ways (rows: i's patches against j, columns:
    j's patches against i), so the pool costs N(N-1)/2 patch-matrix products."""
    n, h, w, d = grid.shape
    if n < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {n}")
    flat = grid.reshape(n, h * w, d).float()
    sq = (flat * flat).sum(-1)  # [N, P]
    nearest = torch.zeros(n, h * w, n)  # [i, patch of i, j]: distance to its nearest patch in image j
    for i in range(n - 1):
        for s in range(i + 1, n, chunk_images):
            o = flat[s : s + chunk_images]  # [m, P, D]
            d2 = sq[i][:, None, None] + sq[s : s + chunk_images][None] - 2.0 * torch.einsum("pd,mqd->pmq", flat[i], o)
            d2 = d2.clamp_min(0)  # [P, m, P]
            nearest[i, :, s : s + o.shape[0]] = d2.amin(-1).sqrt()  # i's patches -> nearest in each j
            nearest[s : s + o.shape[0], :, i] = d2.amin(0).sqrt()  # [m, P]: j's patches -> nearest in i
    others = ~torch.eye(n, dtype=torch.bool)  # drop each image's distance to itself
    per_image = nearest.permute(0, 2, 1)[others].reshape(n, n - 1, h * w).permute(0, 2, 1)  # [N, P, N-1]
    return interval_mean(per_image, topmin).reshape(n, h, w)


def rescore(scores: torch.Tensor, global_feats: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """RsCIN: scores [N], global features [N, E] -> mean over k in `ks` of the mean score of each image's k most
    similar images (cosine, itself included; k capped at N). Empty `ks` returns the scores unchanged."""
    if not ks:
        return scores
    g = F.normalize(global_feats.float(), dim=-1)
    order = (g @ g.T).argsort(dim=1, descending=True, stable=True)  # [N, N]; itself first (cos 1)
    n = scores.shape[0]
    return torch.stack([scores[order[:, : min(k, n)]].mean(1) for k in ks]).mean(0)
