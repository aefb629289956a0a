"""Tiling maths (kit/tiling.py) against slow per-pixel references; the tiling params section's checks."""
import pytest
import torch

from anomaly_core.config import build
from anomaly_core.errors import ConfigError
from anomaly_core.kit.tiling import TilingConfig, cut_tiles, stitch, tile_grid, tile_starts


def test_tile_starts_cover_every_pixel_last_tile_flush():
    assert tile_starts(1024, 224, 160) == [0, 160, 320, 480, 640, 800]
    assert tile_starts(224, 224, 160) == [0]
    assert tile_starts(500, 224, 224) == [0, 224, 276]
    for length, tile, stride in [(1024, 224, 160), (700, 224, 200), (300, 64, 64), (225, 224, 1)]:
        starts = tile_starts(length, tile, stride)
        covered = torch.zeros(length, dtype=torch.bool)
        for s in starts:
            assert 0 <= s <= length - tile
            covered[s : s + tile] = True
        assert covered.all()
    with pytest.raises(ValueError, match="smaller than the tile"):
        tile_starts(100, 224, 160)


def test_cut_tiles_are_the_image_crops():
    img = torch.randint(0, 255, (2, 300, 260, 3), dtype=torch.uint8)
    tiles, pos = cut_tiles(img, 128, 100)
    assert pos.tolist() == tile_grid(300, 260, 128, 100).tolist()
    assert tiles.shape == (2 * len(pos), 128, 128, 3)
    for i in range(2):
        for j, (y, x) in enumerate(pos.tolist()):
            assert torch.equal(tiles[i * len(pos) + j], img[i, y : y + 128, x : x + 128])


def stitch_reference(tile_maps, offsets, h, w):
    """One pixel at a time: the mean of the values of every tile that covers it."""
    out = torch.zeros(tile_maps.shape[0], h, w)
    t = tile_maps.shape[-1]
    for py in range(h):
        for px in range(w):
            vals = [tile_maps[:, j, py - y, px - x] for j, (y, x) in enumerate(offsets.tolist())
                    if y <= py < y + t and x <= px < x + t]
            out[:, py, px] = torch.stack(vals).mean(0)
    return out


def test_stitch_matches_slow_reference_and_averages_overlaps_exactly():
    g = torch.Generator().manual_seed(0)
    pos = tile_grid(50, 41, 16, 11)
    maps = torch.rand(2, len(pos), 16, 16, generator=g)
    assert torch.allclose(stitch(maps, pos, 50, 41), stitch_reference(maps, pos, 50, 41), atol=1e-6)
    # constant tiles: tile j holds the value j; a pixel covered by tiles {a, b} gets (a + b) / 2 exactly
    const = torch.arange(len(pos), dtype=torch.float32)[None, :, None, None].expand(1, -1, 16, 16)
    out = stitch(const, pos, 50, 41)
    assert torch.equal(out, stitch_reference(const, pos, 50, 41))
    assert out[0, 0, 0] == 0 and out[0, 49, 40] == len(pos) - 1
    # an image cut into tiles of its own values and stitched back is itself (overlaps agree)
    img = torch.rand(1, 50, 41, 1, generator=g)
    tiles, pos2 = cut_tiles(img, 16, 11)
    assert torch.allclose(stitch(tiles[..., 0].reshape(1, len(pos2), 16, 16), pos2, 50, 41), img[..., 0], atol=1e-6)


def test_tiling_config_checks_name_the_key():
    cfg = build(TilingConfig, {"enabled": True, "tile": 224, "stride": 160, "resolution": 1024}, "tiling")
    assert cfg.side(700) == 1024 and build(TilingConfig, {}, "tiling").side(700) == 700
    for bad, key in [({"stride": 300}, "tiling.stride=300"), ({"tile": 0}, "tiling.tile=0"),
                     ({"resolution": "full"}, "tiling.resolution='full'"), ({"resolution": 100}, "tiling.resolution=100")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("'", "'")):
            build(TilingConfig, bad, "tiling")


# ----------------------------------------------------------------------------------------------- tiled kNN

from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402

from anomaly_core.kit.knn import KnnConfig, PatchKnn  # noqa: E402
from anomaly_core.kit.tiled_knn import TiledKnn, check_tiled  # noqa: E402


def test_one_tile_covering_the_image_is_the_untiled_knn():
    g = torch.Generator().manual_seed(1)
    shots, tests = torch.randn(3, 7, 7, 5, generator=g), torch.randn(2, 7, 7, 5, generator=g)
    for image_score in ("reweight", "max", "topk_mean"):
        cfg = KnnConfig(image_score=image_score, sigma=2.0)
        tiling = TilingConfig(enabled=True, tile=56, stride=56)
        ref_image, ref_maps = PatchKnn.fit(shots, cfg).predict(tests, 56)
        image, maps = TiledKnn.fit(shots, 1, cfg, tiling).predict(tests, tile_grid(56, 56, 56, 56), (56, 56), 56)
        assert torch.allclose(maps, ref_maps, atol=1e-5) and torch.allclose(image, ref_image, atol=1e-5)


def test_tiled_maps_are_stitched_nearest_distances_of_each_tile():
    """Two tiles per image, position-aware banks: each tile's patch distances are the cdist minima against the
    shots' tiles at the same position; the stitched map (no smoothing, nearest upsampling) averages the overlap."""
    g = torch.Generator().manual_seed(2)
    n_tiles, p, d = 2, 4, 3  # tiles 8 px = 4 patches of 2 px (nearest upsampling), stride 4 along x
    shots, tests = torch.randn(2 * n_tiles, p, p, d, generator=g), torch.randn(1 * n_tiles, p, p, d, generator=g)
    cfg = KnnConfig(image_score="max", sigma=0.0, upsample="nearest")
    tiling = TilingConfig(enabled=True, tile=8, stride=4, position_aware=True)
    offsets = tile_grid(8, 12, 8, 4)
    assert offsets.tolist() == [[0, 0], [0, 4]]
    image, maps = TiledKnn.fit(shots, n_tiles, cfg, tiling).predict(tests, offsets, (8, 12), 12)
    per_tile = []
    for j in range(n_tiles):
        bank = shots.reshape(2, n_tiles, p, p, d)[:, j].reshape(-1, d)
        dist = torch.cdist(tests[j].reshape(-1, d), bank).min(1).values.reshape(p, p)
        per_tile.append(dist.repeat_interleave(2, 0).repeat_interleave(2, 1))  # [8, 8]
    want = torch.zeros(8, 12)
    want[:, :4] = per_tile[0][:, :4]
    want[:, 4:8] = (per_tile[0][:, 4:] + per_tile[1][:, :4]) / 2
    want[:, 8:] = per_tile[1][:, 4:]
    want = torch.nn.functional.interpolate(want[None, None], size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(maps[0], want, atol=1e-5) and torch.isclose(image[0], want.max(), atol=1e-6)


def test_tiled_knn_refusals_are_one_line():
    with pytest.raises(ConfigError, match="knn.branch=visual"):
        check_tiled(KnnConfig(branch="clip"), TilingConfig(enabled=True))
    with pytest.raises(ConfigError, match="position_aware=true with knn.image_score=reweight"):
        check_tiled(KnnConfig(), TilingConfig(enabled=True, position_aware=True))
    check_tiled(replace(KnnConfig(), image_score="max"), TilingConfig(enabled=True, position_aware=True))


def test_params_tiling_section_checks():
    from pathlib import Path

    import yaml

    from anomaly_core.validation import default_schema, validate_params

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert validate_params(params, default_schema()) == []
    bad = {**params, "tiling": {**params["tiling"], "stride": 300}}
    assert validate_params(bad, default_schema()) == ["tiling.stride=300: must be <= tile (224): tiles must cover the image"]
