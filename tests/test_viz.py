"""Tests for anomaly_core.viz: PNGs are written atomically and can be opened."""

import numpy as np
import pytest
from PIL import Image

from anomaly_core.viz import save_curve_plot, save_heatmap_overlays


def test_save_heatmap_overlays(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((32, 32), bool) for _ in range(3)]
    masks[1][8:16, 8:20] = True
    masks[2][0:4, 0:4] = True
    maps = [rng.random((16, 16)).astype(np.float16), rng.random((32, 32)), rng.random((32, 32))]
    out = tmp_path / "sub" / "overlay.png"
    save_heatmap_overlays(out, images, masks, maps, ["good", "scratch", "hole"])
    assert out.stat().st_size > 0
    with Image.open(out) as im:
        w, h = im.size
    assert h > 1 and w > 1
    assert 0.6 < h / w < 2.0  # 3 rows x 3 columns of square panels (plus colorbar)
    assert [p.name for p in out.parent.iterdir()] == ["overlay.png"]


def test_save_heatmap_overlays_rejects_mismatched_lengths(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        save_heatmap_overlays(tmp_path / "x.png", [img], [], [np.zeros((8, 8))], ["a"])
    assert list(tmp_path.iterdir()) == []


def test_save_curve_plot(tmp_path):
    out = tmp_path / "roc.png"
    x = np.linspace(0, 1, 20)
    save_curve_plot(out, {"a": (x, x**0.5), "b": (x.tolist(), x.tolist())}, "FPR", "TPR", "ROC")
    with Image.open(out) as im:
        w, h = im.size
        im.load()
    assert w > 1 and h > 1
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def test_overlay_pixels():
    """The mask overlay fills the mask red with a lime contour and leaves the rest alone; the map overlay is
    half image, half jet colour of the map scaled to [vmin, vmax] (clipped), stretched onto the image."""
    import matplotlib

    from anomaly_core.viz import map_overlay, mask_overlay

    img = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True  # stretched to rows/cols 2..5 of the image
    out = mask_overlay(img, mask)
    assert (out[0] == 100).all() and (out[:, 7] == 100).all()
    assert tuple(out[2, 2]) == (0, 255, 0)                       # contour
    assert tuple(out[3, 3]) == (round(0.65 * 100 + 0.35 * 255), 65, 65)  # fill
    amap = np.zeros((8, 8))
    amap[0, 0], amap[7, 7] = 5.0, -5.0
    got = map_overlay(img, amap, 0.0, 1.0)
    jet = matplotlib.colormaps["jet"]
    for (y, x), v in {(0, 0): 1.0, (7, 7): 0.0, (4, 4): 0.0}.items():
        want = (0.5 * 100 + 0.5 * np.array(jet(v)[:3]) * 255).round()
        assert np.array_equal(got[y, x], want), (y, x)
