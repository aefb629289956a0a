"""predict's prefetching input pipeline (deploy/batching.py): the batches, images and error lines of a plain loop."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomaly_core.deploy.batching import load_one, prefetched_batches
from anomaly_core.features import load_resized


@pytest.mark.parametrize("batch_size,workers,ahead", [(1, 1, 0), (3, 2, 2), (4, 3, 1), (50, 2, 2)])
def test_prefetched_batches_are_the_sequential_decode_in_order(tmp_path, batch_size, workers, ahead):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(10):
        p = tmp_path / f"{i:02d}.png"
        if i in (2, 7):
            p.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    got = list(prefetched_batches(paths, 32, batch_size, workers, ahead))
    assert [g[0] for g in got] == list(range(0, 10, batch_size))
    assert [p for g in got for p in g[1]] == paths
    images = [im for g in got for im in g[2]]
    errors = [e for g in got for e in g[3]]
    for i, (p, im, err) in enumerate(zip(paths, images, errors)):
        if i in (2, 7):
            assert im is None and p.name in err and "\n" not in err
        else:
            assert err == "" and np.array_equal(im, load_resized(str(p), 32))
    assert load_one(tmp_path / "missing.png", 32)[0] is None
