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


def test_scored_batches_on_worker_threads_are_the_serial_scores_in_order(tmp_path):
    """predict's hot path: batches scored on 3 threads at one torch thread each give predict_files the rows of one
    batch at a time at one torch thread (bit-identical; an unreadable file keeps its error row in its place) and of
    one batch at a time on torch's threads up to float rounding; torch's thread count is back afterwards."""
    import shutil

    import torch

    from anomaly_core.deploy.engines import load_predictor
    from anomaly_core.deploy.predict import predict_files
    from tests.test_export import write_tiny_knn_bundle

    rows, _ = write_tiny_knn_bundle(tmp_path)
    cat = sorted({r.category for r in rows})[0]
    paths = [r.image for r in rows if r.category == cat and r.split in ("val", "test")]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    shutil.copy(paths[0], tmp_path / "again.png")
    paths = paths[:4] + [bad] + paths[4:] + [tmp_path / "again.png"]
    threads = torch.get_num_threads()
    default = predict_files(tmp_path / "bundle", paths, tmp_path / "c", cat, batch_size=2, progress=False, workers=1)
    torch.set_num_threads(1)
    try:
        serial = predict_files(tmp_path / "bundle", paths, tmp_path / "a", cat, batch_size=2, progress=False,
                               workers=1)
    finally:
        torch.set_num_threads(threads)
    model = load_predictor(tmp_path / "bundle")
    assert model.concurrent
    calls = []
    orig = type(model).__call__

    def spy(self, images, category, p=None):
        calls.append(torch.get_num_threads())
        return orig(self, images, category, p)

    type(model).__call__ = spy
    try:
        par = predict_files(tmp_path / "bundle", paths, tmp_path / "b", cat, batch_size=2, progress=False, workers=3)
    finally:
        type(model).__call__ = orig
    assert calls and set(calls) == {1}  # every batch on a worker at one intra-op thread
    assert torch.get_num_threads() == threads
    assert len(par) == len(paths) and [r["path"] for r in par] == [str(p) for p in paths]
    assert par == serial
    ok = [i for i, r in enumerate(default) if r["score"] != ""]
    np.testing.assert_allclose([par[i]["score"] for i in ok], [default[i]["score"] for i in ok], rtol=0, atol=1e-4)
    assert par[4]["score"] == "" and "broken.png" in par[4]["error"]
    assert par[-1]["score"] == par[0]["score"] and par[0]["score"] != par[1]["score"]
    assert (tmp_path / "a" / "predictions.csv").read_text() == (tmp_path / "b" / "predictions.csv").read_text()
    from anomaly_core.errors import DataError

    with pytest.raises(DataError, match=r"--workers 0: must be >= 1"):
        predict_files(tmp_path / "bundle", paths, tmp_path / "d", cat, progress=False, workers=0)
