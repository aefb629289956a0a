"""The method interface and registry, the per-stage resolved configs, and MuSc's maths against slow references."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from anomaly_core.errors import ConfigError
from anomaly_core.methods import get_method, method_names, ordered
from anomaly_core.methods.base import Method
from anomaly_core.methods.musc.mutual import interval_mean, mutual_scores, pair_blocks, rescore, working_set_bytes
from anomaly_core.pipeline import stage_configs

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


# ---------------------------------------------------------------------------- registry


def test_every_registered_method_is_complete_and_documented():
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|", readme.split("## Methods and their params")[1].split("### Adding a method")[0],
                      flags=re.M)
    assert rows == method_names() + ["fusion"], rows  # one README row per method, in registry order
    assert PARAMS["methods"] == method_names()  # the default runs every method
    for name in method_names():
        m = get_method(name)
        assert isinstance(m, Method) and m.name == name
        assert m.section in PARAMS, f"{name}: no params.yaml section {m.section}"
        m.build_config(PARAMS)  # the shipped section builds
        assert m.role in ("clip", "visual")
        assert set(m.branches(PARAMS)) <= {"visual", "clip"}
        assert (m.fit is None) == (m.save is None) == (m.load is None), name


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown method 'patchcore' \\(known: aaclip, "):
        get_method("patchcore")
    assert ordered(["musc", "knn"]) == ["knn", "musc"]  # registry order


# ---------------------------------------------------------------------------- resolved per-stage configs


def test_stage_configs_hold_exactly_what_each_stage_reads():
    cfg = stage_configs(PARAMS)
    assert cfg["score-knn"] == {"task": "anomaly", "method": "knn", "seed": 0,
                                "data": {"image_size": PARAMS["data"]["image_size"]}, "knn": PARAMS["knn"]}
    assert cfg["score-vpt_knn"]["knn"] == PARAMS["knn"]  # VPT scores through the kNN branch
    assert cfg["fit-vpt_knn"]["knn"] == {k: PARAMS["knn"][k] for k in ("branch", "patch_aggregate", "patch_pad")}
    # VPT trains on the kNN branch's patch grids; k, sigma, ... are not read, so they never retrain it
    assert cfg["fit-knn"] == {"task": "anomaly", "method": "knn", "skip": "knn: no fit (training-free)"}
    assert cfg["fit-aaclip"]["skip"] == "aaclip: no fit (trained by the train_text_adapter and train_image_adapter stages)"
    assert "skip" not in cfg["fit-prompt_clip"] and "skip" not in cfg["fuse"]
    assert "aaclip_image" not in cfg["train_text_adapter"]  # a stage-2 change never re-runs stage 1
    assert cfg["fuse"]["roles"]["zero_shot_clip"] == "clip" and cfg["fuse"]["roles"]["knn"] == "visual"
    assert cfg["evaluate"]["transductive"] == ["musc"]


def test_knn_only_selection_needs_no_clip_and_disables_aaclip():
    cfg = stage_configs({**PARAMS, "methods": ["knn"]})
    assert list(cfg["features"]["backbones"]) == ["visual"]
    assert cfg["train_text_adapter"] == {"task": "anomaly", "enabled": False}
    assert "backbones" not in cfg["classify"]
    assert "CLIP-branch method" in cfg["fuse"]["skip"]  # nothing to fuse: the stage starts without torch
    assert not [k for k in cfg if k.startswith(("fit-", "score-")) and not k.endswith("-knn")]
    clip_knn = stage_configs({**PARAMS, "methods": ["knn"], "knn": {**PARAMS["knn"], "branch": "clip"}})
    assert list(clip_knn["features"]["backbones"]) == ["clip"]


def test_a_change_to_one_method_changes_only_its_configs():
    before = stage_configs(PARAMS)
    after = stage_configs({**PARAMS, "musc": {**PARAMS["musc"], "topmin": 0.1}})
    # export bundles the score params of whichever method it exports (it re-runs on the new scores anyway)
    assert [k for k in before if before[k] != after[k]] == ["export", "score-musc"]


# ---------------------------------------------------------------------------- MuSc maths


def slow_mutual(grid: torch.Tensor, topmin: float) -> torch.Tensor:
    """Reference: torch.cdist per image pair, python loops."""
    n, h, w, d = grid.shape
    flat = grid.reshape(n, h * w, d).double()
    out = torch.zeros(n, h * w, dtype=torch.float64)
    k = max(1, int(topmin * (n - 1)))  # the official MSM count (floor), at least one
    for i in range(n):
        per_image = torch.stack([torch.cdist(flat[i], flat[j]).min(1).values for j in range(n) if j != i], 1)
        out[i] = per_image.sort(1).values[:, :k].mean(1)
    return out.reshape(n, h, w)


@pytest.mark.parametrize("topmin", [0.3, 1.0, 0.01])
def test_mutual_scores_match_a_slow_reference(topmin):
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(6, 3, 4, 5, generator=g)
    ref = slow_mutual(grid, topmin)
    for chunk in (1, 2, 4, 16):  # blocks of later images, a partial last block, one block for all
        assert torch.allclose(mutual_scores(grid, topmin, chunk_images=chunk).double(), ref, atol=1e-4), chunk


def test_blocked_mutual_scores_match_one_block():
    """Blocks of image rows (pairs across blocks computed once per direction) give the one-block scores."""
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(9, 4, 4, 7, generator=g)
    one = mutual_scores(grid, 0.3, rows=9)
    assert torch.allclose(one.double(), slow_mutual(grid, 0.3), atol=1e-4)
    assert torch.equal(mutual_scores(grid, 0.3), one)  # the default budget holds this pool in one block
    for rows, chunk in ((1, 1), (2, 3), (4, 8), (8, 2)):  # a partial last block of rows and of images
        blocked = mutual_scores(grid, 0.3, chunk_images=chunk, rows=rows)
        assert torch.allclose(blocked, one, rtol=1e-6, atol=1e-6), (rows, chunk)
    tiny = mutual_scores(grid, 0.3, max_memory_mb=0.001)  # budget below one row: one row per block
    assert pair_blocks(9, 16, 0.3, 0.001) == (1, 1)
    assert torch.allclose(tiny, one, rtol=1e-6, atol=1e-6)


def test_pair_blocks_fit_the_budget_whatever_the_pool():
    p, budget = 28 * 28, 64.0
    sizes = {n: pair_blocks(n, p, 0.3, budget) for n in (50, 100, 200, 400, 1600)}
    assert sizes[50] == (50, 8)  # small pool: one block, every pair once
    for n, (rows, chunk) in sizes.items():
        assert working_set_bytes(rows, chunk, n, p, 0.3) <= budget * 2**20, n
        if rows < n:  # the block is as large as the budget allows
            assert working_set_bytes(rows + 1, chunk, n, p, 0.3) > budget * 2**20, n
    assert sizes[1600][0] < sizes[400][0] < sizes[200][0] < 200


def test_musc_max_memory_mb_is_validated():
    from anomaly_core.config import build
    from anomaly_core.methods.musc import MuscConfig

    assert build(MuscConfig, {"max_memory_mb": 16}, "musc").max_memory_mb == 16
    with pytest.raises(ConfigError, match="musc.max_memory_mb"):
        build(MuscConfig, {"max_memory_mb": 0}, "musc")


def test_interval_mean_and_rescore_by_hand():
    assert torch.allclose(interval_mean(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 0.5), torch.tensor([1.5]))
    scores = torch.tensor([0.0, 1.0, 10.0])
    glob = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # image 0 ~ image 1; image 2 alone
    # k=2: each image with its most similar other image, weighted by cosine (RsCIN's MMO); k=1: itself
    c01 = 0.9 / (0.82 ** 0.5)  # cos(image 0, image 1)
    c12 = 0.1 / (0.82 ** 0.5)  # cos(image 2, image 1): its closest other image
    k2 = torch.tensor([(0 + c01 * 1) / (1 + c01), (1 + c01 * 0) / (1 + c01), (10 + c12 * 1) / (1 + c12)])
    assert torch.allclose(rescore(scores, glob, [2]), k2)
    assert torch.allclose(rescore(scores, glob, [1, 2]), (scores + k2) / 2)
    assert torch.equal(rescore(scores, glob, []), scores)


def test_a_patch_no_other_image_has_scores_highest():
    """Normal images share a texture; one image carries a patch unlike any other image's: MSM ranks it first."""
    g = torch.Generator().manual_seed(2)
    grid = torch.randn(8, 4, 4, 6, generator=g) * 0.05 + torch.tensor([1.0, 0, 0, 0, 0, 0])
    grid[3, 2, 1] = torch.tensor([0, 0, 0, 0, 0, 3.0])
    s = mutual_scores(grid, 0.3)
    assert s.flatten().argmax() == 3 * 16 + 2 * 4 + 1
