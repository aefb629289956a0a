"""Patch kNN (PatchCore / AnomalyDINO style): memory bank of normal patches, distance to nearest neighbours."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anomaly_core.config import KnnConfig
from anomaly_core.scoring.maps import image_score_from_map, to_image_maps


def cnn_patches(levels: list[torch.Tensor], aggregate: int = 3) -> torch.Tensor:
    """Multi-scale CNN maps -> patch descriptors on the finest grid.

    levels: [N, C_j, h_j, w_j] (finest first or not) -> [N, h, w, sum C_j]; each level is locally averaged
    (`aggregate` x `aggregate`, PatchCore's neighbourhood) and bilinearly upsampled to the finest grid.
    """
    h = max(l.shape[-2] for l in levels)
    w = max(l.shape[-1] for l in levels)
    out = []
    for lvl in levels:
        x = lvl.float()
        if aggregate > 1:
            x = F.avg_pool2d(x, aggregate, stride=1, padding=aggregate // 2, count_include_pad=False)
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        out.append(x)
    return torch.cat(out, dim=1).permute(0, 2, 3, 1).contiguous()


def clip_patches(levels: list[torch.Tensor], grid: int) -> torch.Tensor:
    """CLIP level tokens [N, L, E] per level -> [N, g, g, levels*E] of per-level L2-normalised tokens."""
    toks = [F.normalize(l.float(), dim=-1) for l in levels]
    x = torch.cat(toks, dim=-1)
    return x.reshape(x.shape[0], grid, grid, -1)


def greedy_coreset(bank: torch.Tensor, ratio: float, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Greedy k-center subsampling (PatchCore) on a random projection. bank [M, D] -> indices [ceil(ratio M)]."""
    m = bank.shape[0]
    n = max(1, int(round(m * ratio)))
    if n >= m:
        return torch.arange(m)
    g = torch.Generator().manual_seed(seed)
    proj = bank
    if bank.shape[1] > proj_dim:
        proj = bank @ torch.randn(bank.shape[1], proj_dim, generator=g) / proj_dim**0.5
    first = int(torch.randint(m, (1,), generator=g))
    chosen = [first]
    mind = torch.cdist(proj, proj[first : first + 1]).squeeze(1)  # [M]
    for _ in range(n - 1):
        idx = int(mind.argmax())
        chosen.append(idx)
        mind = torch.minimum(mind, torch.cdist(proj, proj[idx : idx + 1]).squeeze(1))
    return torch.tensor(chosen)


def knn_distance(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096) -> torch.Tensor:
    """Mean Euclidean distance of each query to its k nearest bank rows, by chunked matrix products.

    queries [Q, D], bank [M, D] -> [Q]. Exact (no approximation); memory O(chunk * M).
    """
    k = min(k, bank.shape[0])
    bank = bank.float()
    bank_sq = (bank * bank).sum(1)  # [M]
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk].float()
        d2 = (q * q).sum(1, keepdim=True) + bank_sq[None] - 2.0 * q @ bank.T  # [q, M]
        if k == 1:
            out.append(d2.min(dim=1).values.clamp_min(0).sqrt())
        else:
            out.append(d2.topk(k, dim=1, largest=False).values.clamp_min(0).sqrt().mean(1))
    return torch.cat(out)


class PatchKnn:
    """Memory bank of normal patch descriptors [M, D] and the search settings of a `KnnConfig`.

    `PatchKnn.fit(normal_grid, cfg, seed)` builds the bank (optionally a greedy coreset);
    `distances(grid)` -> patch-grid distances [N, h, w]; `predict(grid, size)` -> (image [N], maps [N, S, S]).
    """

    def __init__(self, bank: torch.Tensor, cfg: KnnConfig):
        self.bank, self.cfg = bank.float(), cfg  # [M, D]

    @classmethod
    def fit(cls, normal_grid: torch.Tensor, cfg: KnnConfig, seed: int = 0) -> "PatchKnn":
        """normal_grid [N, h, w, D] -> a PatchKnn whose bank is all N*h*w patches (or their coreset)."""
        bank = normal_grid.reshape(-1, normal_grid.shape[-1]).float()  # [M, D]
        if cfg.coreset_ratio < 1.0:
            bank = bank[greedy_coreset(bank, cfg.coreset_ratio, seed)]
        return cls(bank, cfg)

    def distances(self, grid: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """grid [N, h, w, D] -> mean distance to the k nearest bank patches [N, h, w]."""
        n, h, w, d = grid.shape
        out = []
        for i in tqdm(range(n), desc="knn", leave=False, disable=not progress):
            out.append(knn_distance(grid[i].reshape(-1, d), self.bank, self.cfg.k, self.cfg.chunk).reshape(h, w))
        return torch.stack(out)

    def predict(self, grid: torch.Tensor, size: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [N, h, w, D] -> (image scores [N], smoothed pixel maps [N, size, size])."""
        maps = to_image_maps(self.distances(grid, progress), size, self.cfg.sigma)
        return image_score_from_map(maps, self.cfg.image_score, self.cfg.top_percent), maps
