"""Data-parallel AA-CLIP stage 2 and sharded feature extraction: 2 CPU processes (gloo, launched with torchrun)
give the same checkpoint (float tolerance) / the same feature file bytes as one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomaly_core import distributed as D
from anomaly_core.methods.aaclip.core import ImageAdapterConfig
from anomaly_core.methods.aaclip.training import _epoch_plan

ROOT = Path(__file__).resolve().parents[1]

TRAIN = r'''
import sys
import numpy as np
import torch
from anomaly_core import distributed as D
from anomaly_core.methods.aaclip import api as A
from anomaly_core.backbones import create_backbone

torch.set_num_threads(1)
out, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 2
ctx = D.init(torch.device("cpu"))
torch.manual_seed(0)
tiny = create_backbone("anomaly-core-tiny-clip", None, [2, 4])
rng = np.random.default_rng(0)
n, size, mask = 7, 224, 28
yy, xx = np.mgrid[:size, :size].astype(np.float32)
images, masks = [], []
for i in range(n):
    img = (100 + 30 * np.sin(xx / 5.0 + i))[:, :, None] * np.array([1.0, 0.9, 0.8]) + rng.normal(0, 4, (size, size, 3))
    m = np.zeros((size, size), bool)
    if i % 2 == 0:
        y, x = rng.integers(2, 10, 2) * 16
        m[y:y + 48, x:x + 48] = True
        img[m] = 250
    images.append(np.clip(img, 0, 255).astype(np.uint8))
    masks.append(m.reshape(mask, 8, mask, 8).any(axis=(1, 3)))
data = (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)).float(),
        torch.tensor([int(i % 2 == 0) for i in range(n)]), ["nut"] * n)
val = tuple(t[:3] for t in data[:3]) + (data[3][:3],)
with torch.no_grad():
    anchors = {"nut": A.class_anchors(tiny, None, ["nut"])[0]}
cfg = A.ImageAdapterConfig(epochs=epochs, batch_size=batch, accum_steps=accum, lr=1e-3, adapt_until=2, image_size=224,
                           seed=5, augment=True)
adapters, history = A.train_image_adapters(tiny, anchors, data, val, cfg, progress=False)
if ctx.is_main:
    torch.save({"state": adapters.state_dict(), "history": history}, out)
D.shutdown()
'''


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ANOMALY_CORE_PROGRESS": "0"}


def _run(script: Path, args: list[str], nproc: int, cwd: Path) -> None:
    launch = [sys.executable, "-m", "anomaly_core.launch", "--nproc", str(nproc), str(script)]
    proc = subprocess.run(launch + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_epoch_plan_is_the_same_for_one_process_with_the_same_effective_batch():
    one = ImageAdapterConfig(batch_size=4, accum_steps=2)
    two = ImageAdapterConfig(batch_size=2, accum_steps=2)
    s1, z1 = _epoch_plan(19, one, torch.Generator().manual_seed(3), 1)
    s2, z2 = _epoch_plan(19, two, torch.Generator().manual_seed(3), 2)
    assert [t.tolist() for t in s1] == [t.tolist() for t in s2] and [len(t) for t in s1] == [8, 8, 3]
    assert torch.equal(z1, z2)
    assert sorted(torch.cat(s1).tolist()) == list(range(19))


def test_shard_round_robin():
    assert [D.shard(7, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert D.world_size() == 1 and D.is_main() and D.gather_objects(5) == [5]


def test_augmentation_per_sample_does_not_depend_on_the_batch():
    from anomaly_core.methods.aaclip.training import augment_batch

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=g)
    masks = (torch.rand(5, 16, 16, generator=g) > 0.7).float()
    seeds = [11, 12, 13, 14, 15]
    x, m = augment_batch(images, masks, 32, (0.5,) * 3, (0.25,) * 3, seeds=seeds)
    for lo, hi in ((0, 2), (2, 5), (4, 5)):
        xs, ms = augment_batch(images[lo:hi], masks[lo:hi], 32, (0.5,) * 3, (0.25,) * 3, seeds=seeds[lo:hi])
        torch.testing.assert_close(xs, x[lo:hi], atol=1e-6, rtol=0)
        assert torch.equal(ms, m[lo:hi])
    x2, _ = augment_batch(images, masks, 32, (0.5,) * 3, (0.25,) * 3, seeds=[s + 100 for s in seeds])
    assert not torch.allclose(x, x2)  # the seeds matter


def test_two_process_training_equals_one_process(tmp_path):
    """2 ranks x batch 2 vs 1 rank x batch 4 (accumulation 1), 7 images: steps of 4 and 3 samples (the last
    step splits 2 + 1 over the ranks), kornia augmentation on, validation selection on."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    _run(script, [str(tmp_path / "one.pt"), "4", "1"], 1, tmp_path)
    _run(script, [str(tmp_path / "two.pt"), "2", "1"], 2, tmp_path)
    _run(script, [str(tmp_path / "init.pt"), "4", "1", "0"], 1, tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    init = torch.load(tmp_path / "init.pt")
    assert one["state"].keys() == two["state"].keys()
    # Adam divides by sqrt(v): a gradient that is ~0 up to float summation order (DDP all-reduce vs one batch)
    # can move its weight by up to lr. A wrong sample order or augmentation moves almost every weight by ~lr
    # (1e-3) per step, so: every weight within lr / 10, and all but 0.1% of them within 1e-6.
    diff = torch.cat([(two["state"][k] - one["state"][k]).abs().flatten() for k in one["state"]])
    moved = torch.cat([(one["state"][k] - init["state"][k]).abs().flatten() for k in one["state"]])
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3, (diff.max(), (diff > 1e-6).float().mean())
    assert moved.median() > 1e-3  # the weights did move (2 epochs x 2 steps at lr 1e-3)
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert h1.keys() == h2.keys()
        for k in h1:
            assert h2[k] == pytest.approx(h1[k], rel=1e-4, abs=1e-5), k
    assert one["history"][-1]["loss"] != one["history"][1]["loss"]  # it trained


FEATURES_CONFIG = {  # data/config/features.json as the validate stage writes it
    "task": "anomaly",
    "backbones": {"clip": {"name": "anomaly-core-tiny-clip", "pretrained": "random", "levels": [2, 4], "image_size": 224}},
    "features": {"batch_size": 3, "dtype": "float16"},
}


def test_two_process_features_stage_writes_identical_bytes(tmp_path, mvtec_tree):
    """The real `features` stage, 1 process vs torchrun with 2. Per category 5 train images (batches 3 + 2: one
    per rank) and 7 test images (batches 3, 3, 1: rank 0 runs the first and the short last one)."""
    from anomaly_core.data import manifest as mf
    from anomaly_core.data.readers import READERS

    work = tmp_path / "work"
    work.mkdir()
    import json

    (work / "features.json").write_text(json.dumps(FEATURES_CONFIG))
    mf.write_manifest(READERS["mvtec"](mvtec_tree, "all"), work / "images.csv")
    stage = str(ROOT / "stages" / "features.py")
    for nproc, out in ((1, "one"), (2, "two")):
        _run(Path(stage), ["--config", "features.json", "--images", "images.csv", "--out", out], nproc, work)
    one = sorted(p.relative_to(work / "one") for p in (work / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(work / "two") for p in (work / "two").rglob("*") if p.is_file())
    assert one == two and len([p for p in one if p.suffix == ".safetensors"]) >= 4
    for rel in one:
        assert (work / "one" / rel).read_bytes() == (work / "two" / rel).read_bytes(), rel
