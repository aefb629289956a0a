"""VPT-kNN on tiles (`tiling.enabled`): the prompts are trained on the cached tile descriptors of the kNN branch
(tiles are the items of the batches and of the embeddings), then the tiled patch kNN of `kit/tiled_knn.py`
scores the prompt-modulated tiles (banks of the shots' modulated tile patches, one or per tile position, stitched
maps with overlaps averaged, image score from the stitched map or the re-weighting).

Training data per category, as `vpt.train_vpt` but per tile: normals = every tile of the k shots ([S * T, h, w, D]
image-major), held-out normals = every tile of the val normals; defects = only the tiles of the sampled val
anomalies that hold a defect pixel of their mask at the tiling resolution (a small defect sits in 1-4 of 36 tiles:
the others are normal surface and would teach the prompts to separate normal from normal). An anomaly without a
mask gives all its tiles.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from anomaly_core.data.manifest import Row
from anomaly_core.kit.knn import KnnConfig
from anomaly_core.kit.scores import Scores
from anomaly_core.kit.tiling import TilingConfig
from anomaly_core.kit.tiled_knn import cached_tile_grids, store_scores
from anomaly_core.methods.vpt_knn.vpt import PromptModulator, VptConfig, train_categories
from anomaly_core.store import FeatureStore

__all__ = ["defect_tiles", "tile_training_grids", "train_vpt_tiled", "score_vpt_tiled"]


def mask_at(row: Row, hw: tuple[int, int]) -> np.ndarray | None:
    """A row's mask as bool [H, W] at the tiled size `hw` (nearest, as `evaluation.masks_for`); None without one."""
    from PIL import Image

    from anomaly_core.data.images import load_mask

    if not row.mask:
        return None
    m = load_mask(row.mask, None)
    if m.shape != tuple(hw):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST)) > 127
    return m


def defect_tiles(rows: Sequence[Row], offsets: torch.Tensor, hw: tuple[int, int], tile: int) -> torch.Tensor:
    """bool [N, T]: the tiles (at `offsets` [T, 2]) of each anomalous row holding at least one mask pixel; every tile
    of a row without a mask (or whose mask misses every tile: it cannot, tiles cover the image) is kept."""
    keep = torch.ones(len(rows), len(offsets), dtype=torch.bool)
    for i, row in enumerate(rows):
        m = mask_at(row, hw)
        if m is None or not m.any():
            continue
        keep[i] = torch.tensor([bool(m[y : y + tile, x : x + tile].any()) for y, x in offsets.tolist()])
    return keep


def tile_training_grids(store: FeatureStore, kcfg: KnnConfig, tiling: TilingConfig):
    """(normal rows -> all their tiles' grids [N * T, h, w, D], defect rows -> their defect tiles' grids [M, h, w, D])."""
    def normal(part: Sequence[Row]) -> torch.Tensor:
        return cached_tile_grids(store, part, kcfg)

    def defect(part: Sequence[Row]) -> torch.Tensor:
        offsets, hw = store.tiles(kcfg.branch, part)
        return normal(part)[defect_tiles(part, offsets, hw, tiling.tile).flatten()]

    return normal, defect


def train_vpt_tiled(store: FeatureStore, rows: Sequence[Row], cfg: VptConfig, kcfg: KnnConfig, tiling: TilingConfig,
                    progress: bool = False) -> tuple[dict[str, PromptModulator], dict[str, dict]]:
    """fit@vpt_knn with tiling: `vpt.train_categories` on the tile grids (module docstring)."""
    grids = tile_training_grids(store, kcfg, tiling)
    return train_categories(rows, cfg, lambda cat: grids, progress)


def score_vpt_tiled(store: FeatureStore, rows: Sequence[Row], kcfg: KnnConfig, tiling: TilingConfig, size: int,
                    seed: int, states: dict[str, PromptModulator]) -> Scores:
    """score@vpt_knn with tiling: the tiled kNN (`kit.tiled_knn.store_scores`) on the prompt-modulated tile grids."""
    return store_scores(store, rows, kcfg, tiling, size, seed, transform=lambda cat, g: states[cat].transform(g))
