"""Anomaly-map post-processing shared by every method: upsampling, Gaussian smoothing, image scores."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """[N, h, w] -> [N, size, size], `mode` bilinear (default) or nearest."""
    align = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(maps[:, None].float(), size=(size, size), mode=mode, **align)[:, 0]


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur [N, H, W] with kornia (kernel 2*ceil(4 sigma)+1, reflect border); sigma <= 0 is a no-op."""
    if sigma <= 0:
        return maps
    k = 2 * math.ceil(4 * sigma) + 1
    import kornia  # here, not at import: `validate` imports the methods for their configs only

    return kornia.filters.gaussian_blur2d(maps[:, None], (k, k), (sigma, sigma), border_type="reflect")[:, 0]


def to_image_maps(patch_maps: torch.Tensor, size: int, sigma: float, mode: str = "bilinear") -> torch.Tensor:
    """Patch-grid scores [N, h, w] -> smoothed pixel maps [N, size, size] (`mode`: bilinear | nearest upsampling)."""
    return smooth(upsample(patch_maps, size, mode), sigma)


def image_score_from_map(maps: torch.Tensor, mode: str = "max", top_percent: float = 1.0) -> torch.Tensor:
    """[N, H, W] -> [N]: the maximum, or the mean of the top `top_percent` % of pixels."""
    flat = maps.flatten(1)
    if mode == "max":
        return flat.max(dim=1).values
    k = max(1, int(round(flat.shape[1] * top_percent / 100.0)))
    return flat.topk(k, dim=1).values.mean(dim=1)


def mix_image_score(p_global: torch.Tensor, maps: torch.Tensor, weight: float) -> torch.Tensor:
    """p_global [N], maps [N, S, S] -> `weight * p_global + (1 - weight) * max(map)` [N]: the image score of
    zero-shot CLIP, multi-prototype, CoOp and AA-CLIP."""
    return weight * p_global + (1.0 - weight) * maps.flatten(1).max(1).values


def minmax(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Affine rescale with statistics computed elsewhere (e.g. on validation); no clipping."""
    return (x - lo) / max(hi - lo, 1e-12)
