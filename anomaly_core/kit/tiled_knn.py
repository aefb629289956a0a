"""Tiled patch kNN at native resolution (shared by the knn and vpt_knn methods, so it lives in the kit): each image is cut into overlapping tiles (kit/tiling.py), every tile goes
through the frozen backbone at its own resolution (tiles are the batch), the shots' tile patches form the memory
bank (one bank, or one per tile position with `tiling.position_aware`), test tiles are scored against it, the
per-tile maps are upsampled to tile pixels and stitched back with overlaps averaged, then smoothed at the output
resolution. The image score comes from the stitched map (`max` / `topk_mean`) or PatchCore's re-weighting over
all tiles of the image (one bank only).

Two entry points, one scoring path (`TiledKnn`): `store_scores` (score@knn with `tiling.enabled`: the features
stage's cached tiles, `fit_category` builds the banks, which the tiled bundle also stores) and `tiled_knn_scores`
(straight from image files: the benchmark).
"""
from __future__ import annotations

from typing import Sequence

import torch

from anomaly_core.data.holdout import shot_rows
from anomaly_core.data.manifest import Row
from anomaly_core.errors import ConfigError
from anomaly_core.kit.knn import KnnConfig, PatchKnn, Transform, check_tiled, knn_search, reweight_scores
from anomaly_core.kit.scores import Scores, score_splits
from anomaly_core.kit.maps import image_score_from_map, smooth, upsample
from anomaly_core.kit.patches import cnn_patches
from anomaly_core.kit.tiling import TilingConfig, extract_tile_features, resize_maps, stitch
from anomaly_core.store import FeatureStore, level_list


@torch.no_grad()
def tile_features(backbone, paths: Sequence[str], tiling: TilingConfig, batch_size: int = 16,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple[int, int]]:
    """Images -> ({"level_j": [N * T, C_j, h_j, w_j]}, tile offsets [T, 2], (H, W) of the tiled images): the
    features stage's `kit.tiling.extract_tile_features` with the tile dimension flattened into the batch."""
    feats, offsets, hw = extract_tile_features(backbone, paths, tiling, batch_size, dtype)
    return {k: v.flatten(0, 1) for k, v in feats.items()}, offsets, hw


def tile_grids(feats: dict[str, torch.Tensor], cfg: KnnConfig) -> torch.Tensor:
    """Tile features -> patch descriptors [N * T, h, w, D] (the kNN's aggregation, per tile, in float32 as the
    cached features are read)."""
    return cnn_patches([lvl.float() for lvl in level_list(feats)], cfg.patch_aggregate, cfg.patch_pad)


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
                     size: int, seed: int = 0, batch_size: int = 16, chunk: int = 4,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One category end to end from the image files (no feature cache): shots' tiles -> banks; `paths` -> (image
    scores [N], maps [N, size, size]). `dtype`: the features' precision (the pipeline caches float16)."""
    check_tiled(cfg, tiling)
    shots, offsets, hw = tile_features(backbone, shot_paths, tiling, batch_size, dtype)
    knn = TiledKnn.fit(tile_grids(shots, cfg), len(offsets), cfg, tiling, seed)
    del shots
    images, maps = [], []
    for s in range(0, len(paths), chunk):  # a few images at a time: bounded memory at any resolution
        feats, offsets2, hw2 = tile_features(backbone, paths[s : s + chunk], tiling, batch_size, dtype)
        if hw2 != hw:
            raise ConfigError(f"test images are {hw2} px, the shots {hw}: set tiling.resolution to a side in px")
        image, m = knn.predict(tile_grids(feats, cfg), offsets2, hw2, size)
        images.append(image)
        maps.append(m)
    return torch.cat(images), torch.cat(maps)


def flat_levels(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached tile features {"level_j": [N, T, C, h, w]} -> {"level_j": [N * T, C, h, w]} (image-major tiles)."""
    return {k: v.flatten(0, 1) for k, v in feats.items() if k.startswith("level_")}


def cached_tile_grids(store: FeatureStore, rows: Sequence[Row], cfg: KnnConfig, category: str = "",
                      transform: Transform | None = None) -> torch.Tensor:
    """The cached tile features of `rows` -> patch descriptors [N * T, h, w, D] (image-major tiles), mapped by
    `transform(category, grids)` when given (VPT-kNN's prompts: bank and queries alike, as `knn_scores`)."""
    grids = tile_grids(flat_levels(store.get(cfg.branch, rows)), cfg)
    return transform(category, grids) if transform is not None else grids


def fit_category(store: FeatureStore, rows: Sequence[Row], category: str, cfg: KnnConfig, tiling: TilingConfig,
                 seed: int = 0, transform: Transform | None = None) -> tuple[TiledKnn, torch.Tensor, tuple[int, int]]:
    """A category's banks from the cached tile features of its shots -> (TiledKnn, tile offsets [T, 2], (H, W))."""
    shots = shot_rows(rows, category)
    offsets, hw = store.tiles(cfg.branch, shots)
    grids = cached_tile_grids(store, shots, cfg, category, transform)  # [S * T, h, w, D]
    return TiledKnn.fit(grids, len(offsets), cfg, tiling, seed), offsets, hw


def store_scores(store: FeatureStore, rows: Sequence[Row], cfg: KnnConfig, tiling: TilingConfig, size: int,
                 seed: int = 0, chunk: int = 4, transform: Transform | None = None) -> Scores:
    """score@knn with tiling: per category, the banks of the shots' cached tiles, then the val / test images'
    cached tiles scored `chunk` images at a time (memory bounded at any resolution), maps stitched and resized to
    `size` (data.image_size) [N, size, size]. `transform(category, grids)` maps the tile descriptors of bank and
    queries alike (VPT-kNN)."""
    check_tiled(cfg, tiling)
    current: dict[str, tuple[TiledKnn, torch.Tensor, tuple[int, int]]] = {}

    def prepare(cat: str) -> None:
        current.clear()
        current[cat] = fit_category(store, rows, cat, cfg, tiling, seed, transform)

    def part_scores(cat: str, part: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        knn, offsets, hw = current[cat]
        got = store.tiles(cfg.branch, part)
        if got[1] != hw:
            raise ConfigError(f"category {cat}: its test images are tiled at {got[1][0]}x{got[1][1]} px, its shots "
                              f"at {hw[0]}x{hw[1]} px; set tiling.resolution to a side in px")
        images, maps = [], []
        for s in range(0, len(part), chunk):
            grids = cached_tile_grids(store, part[s : s + chunk], cfg, cat, transform)
            image, m = knn.predict(grids, offsets, hw, size)
            images.append(image)
            maps.append(m.half())  # the stored precision (score files hold float16 maps): half the memory
        return torch.cat(images), torch.cat(maps)

    return score_splits(rows, part_scores, prepare)
