"""Common frames for same-pixel comparisons (anomaly_core.evaluation.frame_maps / frame_masks, used by
scripts/compare_peer_knn.py): a map or mask of one image region brought to another region and side."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_core.data.manifest import Row
from anomaly_core.evaluation import frame_maps, frame_masks

CROP = (16 / 256, 240 / 256)  # Resize 256 + CenterCrop 224


def test_full_frame_at_the_maps_side_is_the_maps():
    maps = torch.rand(2, 224, 224)
    np.testing.assert_array_equal(frame_maps(maps, (0.0, 1.0), ((0.0, 1.0), 224)), maps.numpy())


def test_center_crop_of_a_256_map_is_its_native_pixels():
    maps = torch.rand(3, 256, 256)
    got = frame_maps(maps, (0.0, 1.0), (CROP, 224))
    np.testing.assert_array_equal(got, maps[:, 16:240, 16:240].numpy())


def test_center_crop_of_a_224_map_cuts_at_14_and_210():
    """224 px over the whole image: the crop region is map pixels 14..209; a map that is 1 there and 0 outside
    gives all ones (a cut one pixel off would bring zeros in at the edge)."""
    maps = torch.zeros(1, 224, 224)
    maps[:, 14:210, 14:210] = 1.0
    got = frame_maps(maps, (0.0, 1.0), (CROP, 224))
    assert got.shape == (1, 224, 224)
    assert got.min() == 1.0
    maps[:, 14, :] = 0.0  # the first kept row now zero: the frame's top row sees it
    assert frame_maps(maps, (0.0, 1.0), (CROP, 224))[0, 0].max() < 0.5


def test_a_crop_map_cannot_give_the_full_frame():
    with pytest.raises(ValueError, match="outside"):
        frame_maps(torch.rand(1, 224, 224), CROP, ((0.0, 1.0), 224))
    # the crop's own frame is the map itself
    maps = torch.rand(1, 224, 224)
    np.testing.assert_array_equal(frame_maps(maps, CROP, (CROP, 224)), maps.numpy())


def test_frame_masks_cut_native_pixels(tmp_path):
    m = np.zeros((256, 256), np.uint8)
    m[0:10, 100:120] = 255      # on the border the crop drops
    m[100:104, 50:60] = 255     # inside it
    Image.fromarray(m).save(tmp_path / "a_mask.png")
    rows = [Row("a", "c", "test", 1, "hole", "a.png", str(tmp_path / "a_mask.png")),
            Row("b", "c", "test", 0, "good", "b.png", "")]
    full = frame_masks(rows, ((0.0, 1.0), 256))
    np.testing.assert_array_equal(full[0], m > 0)
    assert not full[1].any()
    crop = frame_masks(rows, (CROP, 224))
    assert crop.shape == (2, 224, 224)
    assert crop[0].sum() == 4 * 10 and crop[0, 84:88, 34:44].all()   # (100, 50) - 16 = (84, 34)
    at224 = frame_masks(rows, ((0.0, 1.0), 224))
    assert at224[0, :9].any()   # the border defect stays in the full frame
