"""Tiled patch kNN at native resolution: each image is cut into overlapping tiles (kit/tiling.py), every tile goes
through the frozen backbone at its own resolution (tiles are the batch), the shots' tile patches form the memory
bank (one bank, or one per tile position with `tiling.position_aware`), test tiles are scored against it, the
per-tile maps are upsampled to tile pixels and stitched back with overlaps averaged, then smoothed at the output
resolution. The image score comes from the stitched map (`max` / `topk_mean`) or PatchCore's re-weighting over
all tiles of the image (one bank only).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from anomaly_core.data.images import load_image
from anomaly_core.errors import ConfigError
from anomaly_core.features import encode_batch
from anomaly_core.kit.knn import KnnConfig, PatchKnn, knn_search, reweight_scores
from anomaly_core.kit.maps import image_score_from_map, smooth, upsample
from anomaly_core.kit.patches import cnn_patches
from anomaly_core.kit.tiling import TilingConfig, cut_tiles, resize_maps, stitch
from anomaly_core.store import level_list


def check_tiled(cfg: KnnConfig, tiling: TilingConfig, section: str = "tiling") -> None:
    """One-line refusals of the settings the tiled kNN does not support."""
    if cfg.branch != "visual":
        raise ConfigError(f"{section}.enabled=true needs knn.branch=visual (got {cfg.branch}): CLIP tokens are not tiled")
    if tiling.position_aware and cfg.image_score == "reweight":
        raise ConfigError(f"{section}.position_aware=true with knn.image_score=reweight: the re-weighting needs one bank "
                          "(set knn.image_score to max or topk_mean)")


def load_at(path: str, tiling: TilingConfig) -> np.ndarray:
    """An image as uint8 [H, W, 3] at the tiling resolution (native, or resized square with PIL bicubic)."""
    img = load_image(path)
    if tiling.resolution != "native" and img.shape[:2] != (tiling.resolution,) * 2:
        side = int(tiling.resolution)
        img = np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
    return img


@torch.no_grad()
def tile_features(backbone, paths: Sequence[str], tiling: TilingConfig, batch_size: int = 16,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple[int, int]]:
    """Images -> ({"level_j": [N * T, C_j, h_j, w_j]}, tile offsets [T, 2], (H, W) of the tiled images).

    All images of a call must share one size at the tiling resolution. Tiles are encoded `batch_size` at a time
    (the batch dimension runs over tiles), at `tiling.tile` px: the backbone input size is the tile side.
    """
    out: dict[str, list[torch.Tensor]] = {}
    offsets, hw = None, None
    for path in paths:
        img = torch.from_numpy(np.array(load_at(str(path), tiling)))[None]  # [1, H, W, 3]
        if hw is None:
            hw = tuple(img.shape[1:3])
        elif tuple(img.shape[1:3]) != hw:
            raise ConfigError(f"{path}: {tuple(img.shape[1:3])} px differs from the other images' {hw}; "
                              "set tiling.resolution to a side in px")
        tiles, offsets = cut_tiles(img, tiling.tile, tiling.stride)
        for s in range(0, tiles.shape[0], batch_size):
            for key, value in encode_batch(backbone, tiles[s : s + batch_size], dtype).items():
                out.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in out.items()}, offsets, hw


def tile_grids(feats: dict[str, torch.Tensor], cfg: KnnConfig) -> torch.Tensor:
    """Tile features -> patch descriptors [N * T, h, w, D] (the kNN's aggregation, per tile)."""
    return cnn_patches(level_list(feats), cfg.patch_aggregate, cfg.patch_pad)


class TiledKnn:
    """Banks of the shots' tile patches: one `PatchKnn` over every tile, or one per tile position."""

    def __init__(self, banks: list[PatchKnn], n_tiles: int, cfg: KnnConfig, tiling: TilingConfig):
        self.banks, self.n_tiles, self.cfg, self.tiling = banks, n_tiles, cfg, tiling

    @classmethod
    def fit(cls, shot_grids: torch.Tensor, n_tiles: int, cfg: KnnConfig, tiling: TilingConfig, seed: int = 0) -> "TiledKnn":
        """shot_grids [S * T, h, w, D] (image-major tiles) -> the banks."""
        check_tiled(cfg, tiling)
        if tiling.position_aware:
            per = shot_grids.reshape(-1, n_tiles, *shot_grids.shape[1:])  # [S, T, h, w, D]
            return cls([PatchKnn.fit(per[:, j], cfg, seed) for j in range(n_tiles)], n_tiles, cfg, tiling)
        return cls([PatchKnn.fit(shot_grids, cfg, seed)], n_tiles, cfg, tiling)

    def predict(self, grids: torch.Tensor, offsets: torch.Tensor, hw: tuple[int, int], size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """grids [N * T, h, w, D] of test tiles -> (image scores [N], stitched smoothed maps [N, size, size])."""
        t = self.n_tiles
        n = grids.shape[0] // t
        _, h, w, d = grids.shape
        if len(self.banks) == 1:
            d2, ids = self.banks[0].search(grids)  # [N*T, h*w, k]
        else:
            per = grids.reshape(n, t, h, w, d)
            res = [self.banks[j].search(per[:, j]) for j in range(t)]  # [N, h*w, k] each
            d2 = torch.stack([r[0] for r in res], 1).reshape(n * t, h * w, -1)
            ids = torch.stack([r[1] for r in res], 1).reshape(n * t, h * w, -1)
        dist = d2.sqrt()
        patch = dist.mean(2).reshape(n * t, h, w)
        tile_px = upsample(patch, self.tiling.tile, self.cfg.upsample).reshape(n, t, self.tiling.tile, self.tiling.tile)
        maps = smooth(resize_maps(stitch(tile_px, offsets, *hw), size), self.cfg.sigma)  # [N, size, size]
        if self.cfg.image_score == "reweight":
            bank = self.banks[0]
            exact = lambda q, k: knn_search(q, bank.bank, k, self.cfg.max_memory_mb, bank.bank_sq)  # noqa: E731
            image = reweight_scores(dist[:, :, 0].reshape(n, t * h * w), ids[:, :, 0].reshape(n, t * h * w),
                                    grids.reshape(n, t * h * w, d), bank.bank, self.cfg.reweight_neighbors,
                                    self.cfg.max_memory_mb, exact)
        else:
            image = image_score_from_map(maps, self.cfg.image_score, self.cfg.top_percent)
        return image, maps


def tiled_knn_scores(backbone, shot_paths: Sequence[str], paths: Sequence[str], cfg: KnnConfig, tiling: TilingConfig,
                     size: int, seed: int = 0, batch_size: int = 16, chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """One category end to end: shots' tiles -> banks; `paths` -> (image scores [N], maps [N, size, size])."""
    check_tiled(cfg, tiling)
    shots, offsets, hw = tile_features(backbone, shot_paths, tiling, batch_size)
    knn = TiledKnn.fit(tile_grids(shots, cfg), len(offsets), cfg, tiling, seed)
    del shots
    images, maps = [], []
    for s in range(0, len(paths), chunk):  # a few images at a time: bounded memory at any resolution
        feats, offsets2, hw2 = tile_features(backbone, paths[s : s + chunk], tiling, batch_size)
        if hw2 != hw:
            raise ConfigError(f"test images are {hw2} px, the shots {hw}: set tiling.resolution to a side in px")
        image, m = knn.predict(tile_grids(feats, cfg), offsets2, hw2, size)
        images.append(image)
        maps.append(m)
    return torch.cat(images), torch.cat(maps)
