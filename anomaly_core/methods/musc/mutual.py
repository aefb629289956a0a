"""MuSc maths (Li et al., ICLR 2024): zero-shot mutual scoring of unlabeled images.

* LNAMD: patch descriptors aggregated over r x r neighbourhoods for several r (the caller builds one grid per r);
* MSM: a patch of image i gets, for every other image j, the distance to its nearest patch in j; these N - 1
  distances are sorted and the lowest `topmin` share is averaged (normal patches find close matches in most
  images, a defect patch in few or none);
* RsCIN: image scores re-scored by the cosine-weighted mean over each image's k most similar images (global
  features, itself included), averaged over several k.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def interval_mean(dist: torch.Tensor, topmin: float) -> torch.Tensor:
    """[..., M] -> [...]: mean of the smallest max(1, int(topmin * M)) values (the official MSM's count: floor,
    e.g. 2 of 9 at topmin 0.3, not round's 3; at least one where the official would average none)."""
    k = max(1, int(topmin * dist.shape[-1]))
    return dist.topk(k, dim=-1, largest=False).values.mean(-1)


def mutual_scores(grid: torch.Tensor, topmin: float = 0.3, chunk_images: int = 8) -> torch.Tensor:
    """MSM over a pool of unlabeled images: grid [N, h, w, D] (N >= 2) -> patch scores [N, h, w].

    Each image pair's distance matrix is computed once and read both ways (rows: i's patches against j, columns:
    j's patches against i), so the pool costs N(N-1)/2 patch-matrix products. Image i is compared with
    `chunk_images` later images at a time: one `addmm` [P, D] x [D, m*P] with the norm trick (|o|^2 as the bias,
    |q|^2 added in place), two `amin`s; clamp and sqrt only on the minima (both monotone)."""
    n, h, w, d = grid.shape
    if n < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {n}")
    p = h * w
    flat = grid.reshape(n, p, d).float()
    sq = (flat * flat).sum(-1)  # [N, P]
    nearest = torch.zeros(n, p, n)  # [i, patch of i, j]: distance to its nearest patch in image j
    for i in range(n - 1):
        for s in range(i + 1, n, chunk_images):
            e = min(s + chunk_images, n)
            m = e - s
            d2 = torch.addmm(sq[s:e].reshape(1, m * p), flat[i], flat[s:e].reshape(m * p, d).T, alpha=-2.0)
            d2 = d2.add_(sq[i][:, None]).view(p, m, p)  # [P of i, m, P of j]: squared distances
            nearest[i, :, s:e] = d2.amin(-1).clamp_min_(0).sqrt_()  # i's patches -> nearest in each j
            nearest[s:e, :, i] = d2.amin(0).clamp_min_(0).sqrt_()  # [m, P]: j's patches -> nearest in i
    others = ~torch.eye(n, dtype=torch.bool)  # drop each image's distance to itself
    per_image = nearest.permute(0, 2, 1)[others].reshape(n, n - 1, p).permute(0, 2, 1)  # [N, P, N-1]
    return interval_mean(per_image, topmin).reshape(n, h, w)


def rescore(scores: torch.Tensor, global_feats: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """RsCIN (the official `MMO`): scores [N], global features [N, E] -> mean over k in `ks` of the
    similarity-weighted mean score of each image's k most similar images (cosine weights, itself included; k capped
    at N). Empty `ks` returns the scores unchanged. The official code min-max normalises the scores first; a
    weighted mean commutes with that affine map, so the ranking is the same and the scores keep their scale."""
    if not ks:
        return scores
    g = F.normalize(global_feats.float(), dim=-1)
    sim = g @ g.T  # [N, N]; itself first (cos 1)
    n = scores.shape[0]
    out = []
    for k in ks:
        keep = torch.zeros_like(sim).scatter_(1, sim.topk(min(k, n), dim=1).indices, 1.0)
        w = sim * keep
        out.append((w / w.sum(1, keepdim=True)) @ scores.float())
    return torch.stack(out).mean(0)
