"""Tiling at native resolution: cut images into overlapping tiles, stitch per-tile maps back (overlaps averaged).

Method-free maths shared by every tiled method (kNN today): `tile_starts` places tiles along one axis (the last
tile flush with the far edge, so every pixel is covered and no tile is padded), `cut_tiles` cuts a batch of
images into [N * T, tile, tile, 3] tiles (T per image, row-major), `stitch` sums per-tile maps into the image
and divides by the per-pixel tile count (so overlaps are averaged exactly), `TilingConfig` is the `tiling`
params section.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from anomaly_core.config import Checks

__all__ = ["TilingConfig", "tile_starts", "tile_grid", "cut_tiles", "stitch", "resize_maps"]


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
