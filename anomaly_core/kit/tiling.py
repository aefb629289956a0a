"""Tiling at native resolution: cut images into overlapping tiles, stitch per-tile maps back (overlaps averaged).

Method-free maths shared by every tiled method (kNN today): `tile_starts` places tiles along one axis (the last
tile flush with the far edge, so every pixel is covered and no tile is padded), `cut_tiles` cuts a batch of
images into [N * T, tile, tile, 3] tiles (T per image, row-major), `stitch` sums per-tile maps into the image
and divides by the per-pixel tile count (so overlaps are averaged exactly), `TilingConfig` is the `tiling`
params section, `extract_tile_features` the features stage's (and a tiled bundle's) per-tile encoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from anomaly_core.config import Checks
from anomaly_core.errors import ConfigError

__all__ = ["TilingConfig", "tiling_from", "tile_starts", "tile_grid", "cut_tiles", "stitch", "resize_maps", "load_at",
           "extract_tile_features"]


@dataclass
class TilingConfig:
    """`tiling`: overlapping tiles of the image at `resolution` (native = as read; an int = square resize)."""
    enabled: bool = False
    tile: int = 224                 # tile side px (= the backbone input: tiles are never resized)
    stride: int = 160               # tile step px (<= tile: overlapping or touching tiles)
    resolution: Union[str, int] = "native"   # native | <int> (square side px the image is resized to first)
    position_aware: bool = False    # kNN: one bank per tile position (aligned objects) instead of one bank of all tiles

    def validate(self, section: str) -> None:
        c = Checks(section).positive(tile=self.tile, stride=self.stride)
        c.that(self.stride <= self.tile, "stride", self.stride, f"must be <= tile ({self.tile}): tiles must cover the image")
        if isinstance(self.resolution, str):
            c.that(self.resolution == "native", "resolution", self.resolution, "native or a side in px")
        else:
            c.that(self.resolution >= self.tile, "resolution", self.resolution, f"must be >= tile ({self.tile})")
        c.done()

    def side(self, native: int) -> int:
        """The side (px) tiles are cut at for an image whose native side is `native`."""
        return native if self.resolution == "native" else int(self.resolution)


def tiling_from(params: dict) -> "TilingConfig | None":
    """The `tiling` entry of a stage's resolved config as a TilingConfig, or None when it is absent or disabled
    (`validate` writes it into the configs of `features` and the tiling methods' stages only when enabled, so the
    default path's configs, and DVC's hashes of them, do not change)."""
    from anomaly_core.config import build

    raw = params.get("tiling")
    if not raw or not raw.get("enabled"):
        return None
    return build(TilingConfig, raw, "tiling", strict=True)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along an axis of `length` px: 0, stride, 2 stride, ... and a last tile flush with the end.

    length < tile is refused (tiles are never padded). Every pixel is covered by at least one tile.
    """
    if length < tile:
        raise ValueError(f"image side {length} px is smaller than the tile ({tile} px)")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, stride: int) -> torch.Tensor:
    """(y, x) offsets of every tile of a [height, width] image, row-major: long [T, 2]."""
    ys, xs = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    return torch.tensor([(y, x) for y in ys for x in xs], dtype=torch.long)


def cut_tiles(images: torch.Tensor, tile: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N, H, W, C] -> (tiles [N * T, tile, tile, C] (image-major, then row-major tiles), offsets [T, 2])."""
    n, h, w, c = images.shape
    pos = tile_grid(h, w, tile, stride)
    tiles = torch.stack([images[:, y : y + tile, x : x + tile] for y, x in pos.tolist()], 1)  # [N, T, t, t, C]
    return tiles.reshape(n * len(pos), tile, tile, c), pos


def stitch(tile_maps: torch.Tensor, offsets: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-tile maps [N, T, t, t] at `offsets` [T, 2] -> [N, height, width]: the mean over the tiles covering each
    pixel (a sum of tile values divided by the per-pixel tile count; float32)."""
    n, t_count, t, _ = tile_maps.shape
    total = torch.zeros(n, height, width)
    count = torch.zeros(height, width)
    for j, (y, x) in enumerate(offsets.tolist()):
        total[:, y : y + t, x : x + t] += tile_maps[:, j].float()
        count[y : y + t, x : x + t] += 1
    return total / count


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W] -> [N, size, size] (bilinear, align_corners False); unchanged when already that size."""
    if maps.shape[-2:] == (size, size):
        return maps
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


# ---------------------------------------------------------------------------- tile features (the features stage, predict)


def load_at(path: str, tiling, max_pixels: int | None = None) -> np.ndarray:
    """An image as uint8 [H, W, 3] at the tiling resolution (`tiling.resolution`: native, or a square side in px,
    PIL bicubic as `load_resized`)."""
    from PIL import Image

    from anomaly_core.data.images import load_image

    img = load_image(path, max_pixels)
    if tiling.resolution != "native" and img.shape[:2] != (int(tiling.resolution),) * 2:
        side = int(tiling.resolution)
        img = np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
    return img


@torch.no_grad()
def extract_tile_features(backbone, paths: Sequence[str], tiling, batch_size: int = 16,
                          dtype: torch.dtype = torch.float16, desc: str = "tiles", progress: bool = False,
                          max_pixels: int | None = None
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple[int, int]]:
    """Images -> ({"level_j": [N, T, C_j, h_j, w_j]} in `dtype`, tile offsets [T, 2] (y, x), (H, W) tiled).

    Each image is cut into its T overlapping `tiling.tile` px tiles (kit/tiling.py); an image's tiles are the batch
    (`batch_size` tiles per backbone call), so an image's features never depend on the images read with it (the
    features stage and predict give the same values). All images of a call share one size at the tiling
    resolution (a ConfigError names the first that differs).
    """
    from tqdm.auto import tqdm

    from anomaly_core.features import encode_batch  # imported here: `validate` reads TilingConfig only

    out: dict[str, list[torch.Tensor]] = {}
    offsets, hw = None, None
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    for path in paths:
        img = torch.from_numpy(np.array(load_at(str(path), tiling, max_pixels)))[None]  # [1, H, W, 3]
        if hw is None:
            hw = tuple(img.shape[1:3])
        elif tuple(img.shape[1:3]) != hw:
            raise ConfigError(f"{path}: {img.shape[1]}x{img.shape[2]} px differs from the other images' "
                              f"{hw[0]}x{hw[1]} px of its category; set tiling.resolution to a side in px")
        tiles, offsets = cut_tiles(img, tiling.tile, tiling.stride)  # [T, t, t, 3]
        parts: dict[str, list[torch.Tensor]] = {}
        for s in range(0, tiles.shape[0], batch_size):
            for key, value in encode_batch(backbone, tiles[s : s + batch_size], dtype).items():
                parts.setdefault(key, []).append(value)
        for key, value in parts.items():
            out.setdefault(key, []).append(torch.cat(value))  # [T, ...]
        bar.update(1)
    bar.close()
    return {k: torch.stack(v) for k, v in out.items()}, offsets, hw
