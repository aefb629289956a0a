"""Patch descriptors of cached features: multi-scale CNN maps locally aggregated onto the finest grid, or
per-level normalised CLIP tokens on their grid (the inputs of every patch-matching method: kNN, VPT, MuSc)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from anomaly_core.data.manifest import Row
from anomaly_core.store import FeatureStore

__all__ = ["cnn_patches", "clip_patches", "patch_grid", "clip_grid"]


def cnn_patches(levels: list[torch.Tensor], aggregate: int = 3, pad_mode: str = "zeros") -> torch.Tensor:
    """Multi-scale CNN maps -> patch descriptors on the finest grid.

    levels: [N, C_j, h_j, w_j] -> [N, h, w, sum C_j]; each level is locally averaged (`aggregate` x `aggregate`,
    PatchCore's neighbourhood) and bilinearly upsampled to the finest grid. `pad_mode` sets the border of the
    averaging: "exclude" averages the in-image cells only, "zeros" counts zero padding (anomalib's
    `AvgPool2d(3, 1, 1)`), "replicate" repeats the edge cells.
    """
    h = max(l.shape[-2] for l in levels)
    w = max(l.shape[-1] for l in levels)
    out = []
    for lvl in levels:
        x = lvl.float()
        if aggregate > 1:
            p = aggregate // 2
            if pad_mode == "replicate":
                x = F.avg_pool2d(F.pad(x, (p, p, p, p), mode="replicate"), aggregate, stride=1)
            else:
                x = F.avg_pool2d(x, aggregate, stride=1, padding=p, count_include_pad=pad_mode == "zeros")
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        out.append(x)
    return torch.cat(out, dim=1).permute(0, 2, 3, 1).contiguous()


def clip_patches(levels: list[torch.Tensor], grid: int) -> torch.Tensor:
    """CLIP level tokens [N, L, E] per level -> [N, g, g, levels*E] of per-level L2-normalised tokens."""
    toks = [F.normalize(l.float(), dim=-1) for l in levels]
    x = torch.cat(toks, dim=-1)
    return x.reshape(x.shape[0], grid, grid, -1)


def clip_grid(store: FeatureStore) -> int:
    """The CLIP patch grid side from the feature store's info (an int, or [gh, gw] with gh == gw)."""
    grid = store.info["clip"]["grid"]
    return int(grid[0] if isinstance(grid, (list, tuple)) else grid)


def patch_grid(store: FeatureStore, branch: str, rows: Sequence[Row], aggregate: int,
               pad: str = "zeros") -> torch.Tensor:
    """Cached features of `rows` -> patch descriptors [N, h, w, D] (CNN maps locally aggregated with border `pad`,
    or per-level normalised CLIP tokens)."""
    feats = store.get(branch, rows)
    levels = store.levels(feats)
    if branch == "clip":
        return clip_patches(levels, store.info["clip"]["grid"])
    return cnn_patches(levels, aggregate, pad)
