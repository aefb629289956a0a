"""Anomaly score fusion: val-only normalisation, alpha sweep on val, endpoints, ties, method choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_core.config import build
from anomaly_core.errors import ConfigError, DataError
from anomaly_core.fusion import (
    FusionConfig,
    apply_norm,
    best_on_grid,
    fuse_scores,
    mix,
    normalise_stats,
    select_clip_method,
    sweep_alpha,
    val_metric,
    with_endpoints,
)
from anomaly_core.metrics import image_metrics

S = 16  # map size


def _split(rng, n_normal: int, n_anom: int, cat: str, split: str):
    """(ids, labels [N], masks [N,S,S]): anomalous images carry a 4x4 defect square at a random place."""
    n = n_normal + n_anom
    labels = np.array([0] * n_normal + [1] * n_anom)
    masks = np.zeros((n, S, S), dtype=bool)
    for i in range(n_normal, n):
        y, x = rng.integers(0, S - 4, 2)
        masks[i, y:y + 4, x:x + 4] = True
    ids = [f"{cat}/{split}/{i:03d}" for i in range(n)]
    return ids, labels, masks


def _branch(rng, labels, masks, scale: float, offset: float, signal: float, noise_img: float):
    """Noisy image scores and maps on an arbitrary scale: (image [N], maps [N,S,S]) tensors."""
    image = labels * signal + rng.normal(0, noise_img, len(labels))
    maps = masks * signal + rng.normal(0, 1.0, masks.shape)
    as_t = lambda x: torch.tensor(scale * x + offset, dtype=torch.float32)
    return as_t(image), as_t(maps)


@pytest.fixture
def complementary():
    """Two categories; two branches with independent noise and very different scales (fusion must help)."""
    rng = np.random.default_rng(0)
    clip, visual, truth = {"val": {}, "test": {}}, {"val": {}, "test": {}}, {}
    for cat in ("alpha", "beta"):
        for split, (nn, na) in {"val": (60, 60), "test": (80, 80)}.items():
            ids, labels, masks = _split(rng, nn, na, cat, split)
            c_img, c_map = _branch(rng, labels, masks, scale=100.0, offset=7.0, signal=1.0, noise_img=1.0)
            v_img, v_map = _branch(rng, labels, masks, scale=0.01, offset=-3.0, signal=1.0, noise_img=1.0)
            perm = rng.permutation(len(ids))  # the visual branch stores its images in another order
            clip[split][cat] = (ids, c_img, c_map)
            visual[split][cat] = ([ids[i] for i in perm], v_img[perm], v_map[perm])
            if split == "val":
                truth[cat] = (ids, labels, masks)
    return clip, visual, truth


def test_normalise_uses_val_statistics_only(complementary):
    clip, _, _ = complementary
    stats = normalise_stats(clip["val"])
    val = apply_norm(clip["val"], stats)
    test = apply_norm(clip["test"], stats)
    for cat in val:
        assert abs(float(val[cat][1].mean())) < 1e-5 and abs(float(val[cat][1].std(unbiased=False)) - 1) < 1e-4
        assert abs(float(val[cat][2].double().mean())) < 1e-5
        mi, si = stats[cat]["image"]
        expect = (clip["test"][cat][1].double() - mi) / si
        assert torch.allclose(test[cat][1].double(), expect, atol=1e-5)  # test is mapped with val stats, not its own


def test_fusion_beats_both_complementary_branches(complementary):
    clip, visual, truth = complementary
    cfg = FusionConfig(alphas=[0.25, 0.5, 0.75], metric="image_auroc")
    fused, report = fuse_scores(clip, visual, truth, cfg, clip_name="zero_shot_clip")
    assert report["grid"] == [0.0, 0.25, 0.5, 0.75, 1.0]  # endpoints added
    assert report["grid_endpoints_added"] == [0.0, 1.0]
    v = report["val"]
    assert v["fusion"] >= v["clip"] and v["fusion"] >= v["visual"]
    assert v["fusion"] > max(v["clip"], v["visual"]) + 0.01  # strictly better: independent noise averages out
    assert 0.0 < report["alpha"] < 1.0
    assert report["branches"] == {"clip": "zero_shot_clip", "visual": "knn"}
    # the report's fused val metric is what the returned val scores give
    assert val_metric(truth, fused["val"], "image_auroc") == pytest.approx(v["fusion"])
    # test scores keep the clip branch's ids and order, and the fusion also helps on test
    for cat in ("alpha", "beta"):
        assert fused["test"][cat][0] == clip["test"][cat][0]
    def auc(scores):  # labels from the ids: images 80.. of a test split are anomalous
        return np.mean([image_metrics([int(i[-3:]) >= 80 for i in ids], img.numpy())["image_auroc"]
                        for ids, img, _ in scores.values()])
    assert auc(fused["test"]) > auc(clip["test"]) and auc(fused["test"]) > auc(visual["test"])
    # pixel metric and the "mean" metric run too and keep the >= guarantee
    for metric in ("pixel_auroc", "pixel_aupro", "mean"):
        _, rep = fuse_scores(clip, visual, truth, FusionConfig(alphas=[0.5], metric=metric))
        assert rep["val"]["fusion"] >= max(rep["val"]["clip"], rep["val"]["visual"])


def test_alpha_one_equals_normalised_clip(complementary):
    clip, visual, truth = complementary
    # a constant (useless) visual branch: on the grid {0, 1}, alpha = 1 must win
    flat = {s: {c: (ids, torch.zeros_like(img), torch.zeros_like(m)) for c, (ids, img, m) in per.items()}
            for s, per in visual.items()}
    fused, report = fuse_scores(clip, flat, truth, FusionConfig(alphas=[1.0], metric="image_ap"))
    assert report["alpha"] == 1.0 and report["grid"] == [0.0, 1.0]
    assert report["val"]["fusion"] == report["val"]["clip"]
    norm = apply_norm(clip["test"], normalise_stats(clip["val"]))
    for cat in norm:
        assert torch.allclose(fused["test"][cat][1], norm[cat][1], atol=1e-6)
        assert torch.allclose(fused["test"][cat][2], norm[cat][2], atol=1e-5)
    # and mix() at alpha = 1 / 0 returns one branch exactly
    c = apply_norm(clip["val"], normalise_stats(clip["val"]))
    v = {k: (c[k][0], c[k][1] * 0 + 3, c[k][2] * 0 + 3) for k in c}
    assert all(torch.equal(mix(c, v, 1.0)[k][1], c[k][1]) and torch.equal(mix(c, v, 0.0)[k][2], v[k][2]) for k in c)


def test_sweep_alpha_curve(complementary):
    clip, visual, truth = complementary
    same = {c: (ids, img, m) for c, (ids, img, m) in clip["val"].items()}
    norm = apply_norm(same, normalise_stats(same))
    alpha, curve = sweep_alpha(norm, norm, truth, [0.5], "image_auroc")
    assert [a for a, _ in curve] == [0.0, 0.5, 1.0]
    assert len({round(v, 12) for _, v in curve}) == 1 and alpha == 0.5  # identical branches: all tie -> 0.5


def test_grid_and_ties():
    assert with_endpoints([0.5, 0.2, 0.2]) == [0.0, 0.2, 0.5, 1.0]
    with pytest.raises(ConfigError):
        with_endpoints([1.5])
    assert best_on_grid([(0.0, 0.9), (0.3, 0.9), (0.6, 0.9), (1.0, 0.8)]) == 0.6  # closest to 0.5
    assert best_on_grid([(0.4, 0.9), (0.6, 0.9)]) == 0.4  # equidistant: the smaller
    assert best_on_grid([(0.0, 0.95), (0.5, 0.9)]) == 0.0


def test_config_and_missing_scores(complementary):
    cfg = build(FusionConfig, {"alphas": [0, 0.5, 1], "metric": "mean"}, "fusion")
    assert cfg.alphas == [0.0, 0.5, 1.0] and cfg.clip_method == "auto"
    with pytest.raises(ConfigError):
        build(FusionConfig, {"metric": "top1"}, "fusion")
    with pytest.raises(ConfigError):
        build(FusionConfig, {"alphas": [2.0]}, "fusion")
    clip, visual, truth = complementary
    short = {s: {c: (ids[:-1], img[:-1], m[:-1]) for c, (ids, img, m) in per.items()} for s, per in visual.items()}
    with pytest.raises(DataError, match="lacks 1 images"):
        fuse_scores(clip, short, truth, FusionConfig())


def test_category_without_anomalies_stops_the_fusion(complementary):
    """No silent skip: a category where the metric is not computable stops the choice, naming it."""
    clip, visual, truth = complementary
    ids, labels, masks = truth["beta"]
    keep = [i for i in range(len(ids)) if labels[i] == 0]
    truth = {**truth, "beta": ([ids[i] for i in keep], labels[keep], masks[keep])}
    with pytest.raises(DataError, match=r"category beta \(only normal images\)"):
        fuse_scores(clip, visual, truth, FusionConfig())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_stop_fusion_and_method_choice(complementary, bad):
    """NaN / inf in one category never lets a ranking run on fewer categories: the error names method and category."""
    clip, visual, truth = complementary
    ids, img, m = visual["test"]["beta"]
    img = img.clone()
    img[3] = bad
    broken = {**visual, "test": {**visual["test"], "beta": (ids, img, m)}}
    with pytest.raises(DataError, match=r"^knn \(visual branch, test\): category beta has 1 NaN/inf image scores"):
        fuse_scores(clip, broken, truth, FusionConfig())
    ids, img, m = clip["val"]["alpha"]
    m = m.clone()
    m[0, 0, 0] = bad
    cands = {"zero_shot_clip": {**clip["val"], "alpha": (ids, img, m)}, "aaclip": clip["val"]}
    with pytest.raises(DataError, match=r"^zero_shot_clip: category alpha has 0 NaN/inf image scores and 1"):
        select_clip_method(FusionConfig(metric="pixel_auroc"), cands, truth, ["zero_shot_clip", "aaclip"])


def test_constant_branch_gets_zero_z_scores(complementary):
    """A visual branch constant on val (std 0) is mapped to z = 0 on every split (no 1e-12 floor turning a test
    deviation into 1e12): the fused scores are alpha * the clip branch's z-scores; the report names it."""
    clip, visual, truth = complementary
    flat = {s: dict(per) for s, per in visual.items()}
    ids, img, m = visual["val"]["alpha"]
    flat["val"]["alpha"] = (ids, torch.full_like(img, 5.0), torch.full_like(m, 2.0))
    ids_t, img_t, m_t = visual["test"]["alpha"]
    flat["test"]["alpha"] = (ids_t, 5.0 + img_t, m_t)  # varies on test: must still contribute 0
    fused, report = fuse_scores(clip, flat, truth, FusionConfig(alphas=[0.5]))
    assert report["constant_on_val"] == {"clip": [], "visual": ["alpha.image", "alpha.map"]}
    z = apply_norm(clip["test"], normalise_stats(clip["val"]))["alpha"]
    a = report["alpha"]
    assert torch.allclose(fused["test"]["alpha"][1], a * z[1], atol=1e-5)
    assert torch.allclose(fused["test"]["alpha"][2], a * z[2], atol=1e-5)
    assert float(fused["test"]["alpha"][2].abs().max()) < 100
    # float32 rounding noise around a constant counts as constant too
    noisy = torch.full((50,), 0.1, dtype=torch.float32) + torch.tensor([0.0, 1e-8] * 25)
    assert normalise_stats({"c": ([], noisy, noisy[None])})["c"]["image"][1] == 0.0


def test_select_clip_method_auto(complementary):
    clip, visual, truth = complementary
    noisy = {c: (ids, img + 1000 * torch.randn(len(ids)), m) for c, (ids, img, m) in clip["val"].items()}
    cands = {"prompt_clip": noisy, "zero_shot_clip": clip["val"], "aaclip": clip["val"]}
    name, values = select_clip_method(FusionConfig(), cands, truth, ["aaclip", "zero_shot_clip", "prompt_clip"])
    assert name == "aaclip"  # tie with zero_shot_clip -> the earlier in the preference list
    assert values["aaclip"] > values["prompt_clip"]
    assert select_clip_method(FusionConfig(clip_method="prompt_clip"), cands, truth, [])[0] == "prompt_clip"
    with pytest.raises(DataError):
        select_clip_method(FusionConfig(clip_method="vpt"), cands, truth, [])
