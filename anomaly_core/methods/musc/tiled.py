"""MuSc on tiles at native resolution (`tiling.enabled` with `musc.branch: visual`).

The features stage caches each image's T overlapping tiles (`level_j` [N, T, C, h, w], offsets and tiled size in
the file's metadata). Every tile gets its LNAMD patch descriptors (`cnn_patches` per tile, as untiled), then each
test tile's patches are mutually scored against the other pool images':

* pool (default, textures / unaligned parts): against every tile of each other image, i.e. an image is one
  "image" of T x P patches for the pair loop (the nearest patch in image j is searched over all of j's tiles);
* position-aware (`tiling.position_aware`, aligned objects): against the tiles at the same position only, one
  untiled pair loop per position.

The per-tile patch scores are averaged over the LNAMD sizes, upsampled to tile pixels, stitched (overlaps
averaged), resized to the output size and smoothed, a few images at a time; the image score is the stitched map's
maximum, re-scored by RsCIN over global features that average the deepest level over every tile.

Cost and memory: the pool variant's pair loop compares T x P patches per image with T x P (T^2 the untiled
products per image pair), the position-aware one T pair loops of P x P (T times). `musc.max_memory_mb` bounds
each pair loop as untiled, with P counted as T x P in the pool variant (the [rows, T*P, N] nearest distances and
the distance blocks, whose query patches are split when one image pair exceeds half the budget); the pool's tile
features (T times the untiled ones, float32) and its [N, T, h, w] patch scores are held besides.
"""
from __future__ import annotations

from typing import Sequence

import torch

from anomaly_core.data.manifest import Row
from anomaly_core.kit.maps import image_score_from_map, smooth, upsample
from anomaly_core.kit.patches import cnn_patches
from anomaly_core.kit.tiling import TilingConfig, resize_maps, stitch
from anomaly_core.methods.musc.mutual import mutual_scores, rescore
from anomaly_core.store import FeatureStore

__all__ = ["tile_grids", "tiled_patch_scores", "stitched_maps", "tiled_pool"]


def tile_grids(levels: Sequence[torch.Tensor], r: int) -> torch.Tensor:
    """Tiled CNN levels [N, T, C_j, h_j, w_j] -> LNAMD patch descriptors [N, T, h, w, sum C_j] of size `r`, each
    tile aggregated on its own (zero padding at the tile's border, as an untiled image's)."""
    n, t = levels[0].shape[:2]
    g = cnn_patches([lvl.float().flatten(0, 1) for lvl in levels], r)  # [N * T, h, w, D]
    return g.reshape(n, t, *g.shape[1:])


def tiled_patch_scores(grids: torch.Tensor, topmin: float, position_aware: bool = False,
                       max_memory_mb: float = 256.0) -> torch.Tensor:
    """[N, T, h, w, D] -> MSM patch scores [N, T, h, w]: against every tile of the other images (one image of
    T x P patches per pair), or with `position_aware` against their tile at the same position."""
    n, t, h, w, d = grids.shape
    if position_aware:
        return torch.stack([mutual_scores(grids[:, j], topmin, max_memory_mb=max_memory_mb) for j in range(t)], 1)
    return mutual_scores(grids.reshape(n, t * h, w, d), topmin, max_memory_mb=max_memory_mb).reshape(n, t, h, w)


def stitched_maps(patch: torch.Tensor, offsets: torch.Tensor, hw: tuple[int, int], tile: int, size: int,
                  sigma: float, dtype: torch.dtype = torch.float32, chunk: int = 4
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile patch scores [N, T, h, w] at `offsets` [T, 2] of [H, W] images -> (map maxima [N] (float32),
    maps [N, size, size] in `dtype`): bilinear to `tile` px, stitched (overlaps averaged), resized to `size`,
    smoothed (`sigma`), `chunk` images at a time (memory bounded at any resolution)."""
    n, t = patch.shape[:2]
    image, maps = [], []
    for s in range(0, n, chunk):
        part = patch[s : s + chunk]
        px = upsample(part.flatten(0, 1), tile).reshape(part.shape[0], t, tile, tile)  # [m, T, tile, tile]
        m = smooth(resize_maps(stitch(px, offsets, *hw), size), sigma)  # [m, size, size]
        image.append(image_score_from_map(m, "max"))
        maps.append(m.to(dtype))
    return torch.cat(image), torch.cat(maps)


def tiled_pool(store: FeatureStore, rows: Sequence[Row], cfg, tiling: TilingConfig, size: int,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One category's unlabeled pool from its cached visual tiles -> (RsCIN image scores [N], stitched maps
    [N, size, size] in `dtype`). `cfg`: the MuscConfig (branch visual)."""
    offsets, hw = store.tiles("visual", rows)
    levels = store.levels(store.get("visual", rows))  # [N, T, C_j, h_j, w_j] each
    glob = levels[-1].float().mean(dim=(1, 3, 4))  # [N, C]: the deepest level averaged over every tile
    patch = torch.stack([tiled_patch_scores(tile_grids(levels, r), cfg.topmin, tiling.position_aware,
                                            cfg.max_memory_mb)
                         for r in cfg.aggregate_sizes]).mean(0)  # [N, T, h, w]; one size's grids at a time
    del levels
    image, maps = stitched_maps(patch, offsets, hw, tiling.tile, size, cfg.sigma, dtype)
    return rescore(image, glob, cfg.rescore_k), maps
