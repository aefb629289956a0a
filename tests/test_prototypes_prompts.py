"""Multi-prototype, image prototypes, CoOp and VPT: losses by hand, diagnostics, checkpoints, gradients,
tiny training runs, and the train/score entry points on a tiny synthetic feature store."""
from __future__ import annotations

import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_core.data.manifest import Row
from anomaly_core.errors import WeightsError
from anomaly_core.io import save_tensors, write_json
from anomaly_core.kit.knn import KnnConfig
from anomaly_core.methods.image_prototype.prototypes import (
    ImageProtoConfig,
    class_centroids,
    classify,
    fit_image_prototypes,
    normal_centroid_score,
    score_image_prototypes,
)
from anomaly_core.methods.multi_prototype.model import (
    ClipTrainData,
    MultiProtoConfig,
    MultiPrototype,
    fit_multi_prototype,
    init_prototypes,
    load_multi_prototype,
    multi_proto_loss,
    prototype_diagnostics,
    save_multi_prototype,
    score_multi_prototype,
    split_holdout,
    train_multi_prototype,
    usage_range,
)
from anomaly_core.methods.prompt_clip.coop import (
    CoopConfig,
    PromptLearner,
    coop_loss,
    fit_coop,
    load_prompt_clip,
    save_prompt_clip,
    score_prompt_clip,
    train_prompt_clip,
)
from anomaly_core.methods.vpt_knn.vpt import (
    PromptModulator,
    VptConfig,
    contrastive_loss,
    fit_vpt,
    load_vpt,
    save_vpt,
    separability_loss,
    similarity_stats,
    train_vpt,
)
from anomaly_core.reporting import comparison
from anomaly_core.store import FeatureStore

E = 128  # tiny CLIP embedding dim


@pytest.fixture(scope="module")
def clip():
    from anomaly_core.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("anomaly-core-tiny-clip", None, [1, 2, 3, 4])


def unit(*v):
    return torch.tensor(v, dtype=torch.float32)


# ---------------------------------------------------------------------------- VPT losses by hand


NORMALS = torch.stack([unit(1, 0), unit(0.6, 0.8), unit(0.8, 0.6)])


def test_separability_loss_by_hand():
    defect = unit(0, 1)[None]
    nn_sims = [0.6, 0.8, 0.96]  # pairs (1,2), (1,3), (2,3); no self-pairs
    nd_sims = [0.0, 0.8, 0.6]
    sep = (statistics.mean(nn_sims) - statistics.mean(nd_sims)) / (statistics.pstdev(nn_sims)
                                                                   + statistics.pstdev(nd_sims))
    assert float(separability_loss(NORMALS, defect)) == pytest.approx(-sep, abs=1e-5)
    s = similarity_stats(NORMALS, defect)
    assert float(s["mu_nn"]) == pytest.approx(2.36 / 3, abs=1e-6)
    # with self-pairs (three 1.0 similarities) mu_nn would be larger: they really are excluded
    assert float(s["mu_nn"]) < statistics.mean(nn_sims + nn_sims + [1.0, 1.0, 1.0])
    # sign: a defect further from the normals gives a lower (better) loss
    assert float(separability_loss(NORMALS, unit(-1, 0.2)[None])) < float(separability_loss(NORMALS, defect))


def test_contrastive_loss_value():
    defect = unit(0, 1)[None]
    mu_nn, mu_nd = 2.36 / 3, 1.4 / 3
    assert float(contrastive_loss(NORMALS, defect, margin=0.5)) == pytest.approx(1 - mu_nn, abs=1e-6)
    assert float(contrastive_loss(NORMALS, defect, margin=0.3)) == pytest.approx(1 - mu_nn + mu_nd - 0.3, abs=1e-6)


# ---------------------------------------------------------------------------- multi-prototype diagnostics


def test_usage_range_scales_with_k():
    assert usage_range(3) == pytest.approx((0.2, 0.4))
    assert usage_range(5) == pytest.approx((0.12, 0.24))


def test_diagnostics_flag_collapse_and_unbalanced_usage():
    eye = torch.eye(8)
    model = MultiPrototype(eye[:3], eye[3:4].repeat(4, 1))  # 4 identical abnormal prototypes
    patches = eye[0] + 0.01 * torch.randn(50, 8)  # every normal patch nearest to normal prototype 0
    d = prototype_diagnostics(model, patches)
    assert d["abnormal_collapse"] == pytest.approx(1.0, abs=1e-6)
    assert not d["collapse_ok"] and not d["usage_ok"] and not d["healthy"]
    assert d["normal_usage"] == pytest.approx([1.0, 0.0, 0.0])
    assert any("collapsed" in f for f in d["flags"]) and any("unbalanced" in f for f in d["flags"])
    assert d["separation"] == pytest.approx(0.0, abs=1e-6) and d["separation_ok"]


def test_diagnostics_healthy_model():
    eye = torch.eye(8)
    model = MultiPrototype(eye[:3], eye[3:7])
    patches = torch.cat([eye[i].repeat(10, 1) for i in range(3)]) + 0.01 * torch.randn(30, 8)
    d = prototype_diagnostics(model, patches)
    assert d["healthy"] and d["flags"] == [] and d["normal_usage"] == pytest.approx([1 / 3] * 3)


# ---------------------------------------------------------------------------- checkpoints


def test_old_single_anchor_checkpoint_refused(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"text_features": torch.randn(2, 16), "feature_gallery1": torch.randn(4, 16)}, path)
    with pytest.raises(WeightsError, match="old single-anchor.*re-trained with the multi-prototype code"):
        load_multi_prototype(path)


def test_multi_prototype_round_trip(tmp_path):
    model = MultiPrototype(torch.randn(3, 16), torch.randn(6, 16), temperature=0.05)
    save_multi_prototype(tmp_path / "m.pt", model, "tiny", MultiProtoConfig(), category="alpha")
    back, obj = load_multi_prototype(tmp_path / "m.pt", "tiny")
    assert torch.equal(back.normal_prototypes, model.normal_prototypes)
    assert torch.equal(back.abnormal_prototypes, model.abnormal_prototypes)
    assert back.temperature == 0.05 and obj["category"] == "alpha" and obj["config"]["n_pro_ab"] == 6
    with pytest.raises(WeightsError, match="architecture"):
        load_multi_prototype(tmp_path / "m.pt", "other")


def test_vpt_round_trip(tmp_path):
    model = PromptModulator(torch.randn(5, 12), 0.02, learnable_scale=True)
    with torch.no_grad():
        model.scale.add_(torch.arange(12.0))
    save_vpt(tmp_path / "v.pt", model, "effnet", VptConfig(), history={"loss": [1.0]})
    back, obj = load_vpt(tmp_path / "v.pt", "effnet")
    x = torch.randn(2, 3, 3, 12)
    assert torch.equal(back(x), model(x)) and obj["history"] == {"loss": [1.0]}


# ---------------------------------------------------------------------------- gradients and identity


def test_gradients_reach_prototypes():
    model = MultiPrototype(torch.randn(3, 16), torch.randn(6, 16))
    multi_proto_loss(model, torch.randn(40, 16), torch.randn(10, 16), torch.randn(4, 16), torch.randn(2, 16)).backward()
    assert model.normal_prototypes.grad.abs().sum() > 0 and model.abnormal_prototypes.grad.abs().sum() > 0


@pytest.mark.parametrize("class_specific", [False, True])
def test_gradients_reach_coop_context(clip, class_specific):
    learner = PromptLearner(clip, "metal_nut", n_ctx=4, class_specific=class_specific)
    assert learner.ctx.shape == ((2, 4, clip.text_width) if class_specific else (4, clip.text_width))
    loss = coop_loss(learner.compute_anchors(clip), torch.randn(30, E), torch.randn(10, E), torch.randn(3, E),
                     torch.randn(2, E), 0.01)
    loss.backward()
    grad = learner.ctx.grad
    assert grad is not None and grad.abs().sum() > 0
    if class_specific:  # both contexts are used
        assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0


def test_coop_initial_context_is_the_template(clip):
    """n_ctx = 4 starts from "a photo of a": the untrained prompt equals the hand-written one."""
    learner = PromptLearner(clip, "bottle", n_ctx=4)
    with torch.no_grad():
        learned = clip.encode_text(learner.token_ids, embed_hook=learner.embed_hook)[:1]
        plain = clip.encode_text(clip.tokenize([learner.texts[0].replace("X X X X", "a photo of a")]))
    assert torch.allclose(learned, plain, atol=1e-5)


@pytest.mark.parametrize("learnable", [False, True])
def test_gradients_reach_vpt_prompts_and_scale(learnable):
    model = PromptModulator(torch.randn(4, 8), 0.5, learnable_scale=learnable)
    emb = lambda x: model(x).mean(dim=(1, 2))
    separability_loss(emb(torch.randn(4, 3, 3, 8)), emb(torch.randn(2, 3, 3, 8))).backward()
    assert model.prompts.grad.abs().sum() > 0
    if learnable:
        assert model.scale.grad is not None and model.scale.grad.abs().sum() > 0


def test_vpt_scale_zero_is_identity():
    model = PromptModulator(torch.randn(6, 10) * 5, 0.0)
    x = torch.randn(3, 4, 4, 10)
    assert torch.equal(model(x), x) and torch.equal(model.transform(x), x)


# ---------------------------------------------------------------------------- tiny training runs


def synthetic_clip_data(seed: int = 0, dim: int = E) -> ClipTrainData:
    g = torch.Generator().manual_seed(seed)
    normal_dir, abnormal_dir = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    noise = lambda n: torch.randn(n, dim, generator=g)
    return ClipTrainData(normal_dir + noise(300), abnormal_dir + noise(60), normal_dir + noise(6),
                         abnormal_dir + noise(3), 300)


def test_multi_prototype_training_lowers_loss():
    data = synthetic_clip_data()
    model = MultiPrototype(init_prototypes(torch.randn(20, E), 3), init_prototypes(torch.randn(30, E), 6))
    cfg = MultiProtoConfig(epochs=15, batch_size=100, lr=0.01)
    history = fit_multi_prototype(model, data, cfg)
    assert history["loss"][-1] < 0.5 * history["loss"][0]


def test_coop_training_lowers_loss(clip):
    data = synthetic_clip_data(1)
    learner = PromptLearner(clip, "bottle", n_ctx=2)  # random context init
    cfg = CoopConfig(epochs=6, batch_size=150, lr=0.01, patience=10)
    history = fit_coop(learner, clip, data, None, cfg)
    assert history["criterion"] == "train_loss_plateau"
    assert history["loss"][-1] < history["loss"][0]
    assert learner.anchors.abs().sum() > 0  # refreshed after training


def test_vpt_training_lowers_loss_and_keeps_best():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(8, 4, 4, 6, generator=g) + 2.0
    defect = torch.randn(3, 4, 4, 6, generator=g)
    model = PromptModulator(normal.reshape(-1, 6)[:4].clone(), 0.5, learnable_scale=True)
    cfg = VptConfig(epochs=20, batch_size=8, lr=0.05)
    history = fit_vpt(model, normal, defect, None, cfg)
    assert history["loss"][-1] < history["loss"][0]
    assert history["criterion"] == "train_separability"
    assert history["best_separability"] == pytest.approx(max([history["initial"]["separability"]]
                                                             + history["separability"]))
    assert len(history["mu_nn"]) == len(history["mu_nd"]) == cfg.epochs


# ---------------------------------------------------------------------------- image prototypes and comparison


def test_image_prototypes_classify_and_score():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    cents = class_centroids(emb, torch.tensor([0, 0, 1, 1]), 2)
    probs = classify(torch.tensor([[1.0, 0.05], [0.0, 1.0]]), cents)
    assert probs.shape == (2, 2) and probs.argmax(1).tolist() == [0, 1]
    assert torch.allclose(probs.sum(1), torch.ones(2))
    score = normal_centroid_score(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([2.0, 0.0]))
    assert score.tolist() == pytest.approx([0.0, 2.0])


def test_comparison_json():
    out = comparison({"image_auroc": 0.89, "image_ap": 0.955}, {"auroc": 0.8674, "average_precision": 0.9478},
                     category="screw")
    assert out["improvement"]["auroc"] == pytest.approx(0.0226)
    assert out["improvement"]["auroc_relative"] == pytest.approx(100 * 0.0226 / 0.8674)
    assert out["improvement"]["ap_relative"] == pytest.approx(100 * 0.0072 / 0.9478)
    assert out["category"] == "screw" and out["prompt_tuned"]["average_precision"] == 0.955


# ---------------------------------------------------------------------------- entry points on a fake store


GRID, SIZE = 4, 32


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """One category: 4 shots, val 3 normal + 4 anomalous, test 2 + 2; CLIP (2 levels, 4x4 grid, E=128) and
    visual (8 channels, 4x4) features; anomalous tokens inside the mask are shifted."""
    root = tmp_path_factory.mktemp("store")
    g = torch.Generator().manual_seed(0)
    base, shift = torch.randn(E, generator=g), torch.randn(E, generator=g) * 3
    layout = [("train", 0, 1)] * 4 + [("val", 0, 0)] * 3 + [("val", 1, 0)] * 4 + [("test", 0, 0)] * 2 + \
             [("test", 1, 0)] * 2
    rows, feats = [], {"train": [], "test": []}
    for i, (split, label, shot) in enumerate(layout):
        image = _write_png(root / "img" / f"{i}.png", np.zeros((SIZE, SIZE, 3), np.uint8))
        mask, cov = "", torch.zeros(GRID * GRID)
        if label:
            m = np.zeros((SIZE, SIZE), np.uint8)
            m[:16, :16] = 255  # the top-left 2x2 cells of the 4x4 grid
            mask = _write_png(root / "mask" / f"{i}.png", m)
            cov.view(GRID, GRID)[:2, :2] = 1
        src = "train" if split == "train" else "test"
        rows.append(Row(f"alpha/{src}/{'bad' if label else 'good'}/{i}", "alpha", split, label,
                        "bad" if label else "good", image, mask, shot))
        tok = base + torch.randn(2, GRID * GRID, E, generator=g) + cov[None, :, None] * shift  # [levels, L, E]
        vis = torch.randn(8, GRID, GRID, generator=g) + 4 * cov.view(1, GRID, GRID)
        feats[src].append((rows[-1].id, tok, base + shift * label + torch.randn(E, generator=g), vis))
    for src, items in feats.items():
        ids = [it[0] for it in items]
        clip_t = {f"level_{j}": torch.stack([it[1][j] for it in items]).half() for j in range(2)}
        clip_t["global"] = torch.stack([it[2] for it in items]).half()
        save_tensors(root / "feats" / "clip" / "alpha" / f"{src}.safetensors", clip_t, {"ids": ids})
        save_tensors(root / "feats" / "visual" / "alpha" / f"{src}.safetensors",
                     {"level_0": torch.stack([it[3] for it in items]).half()}, {"ids": ids})
    write_json(root / "feats" / "info.json", {"clip": {"grid": GRID, "embed_dim": E}, "visual": {}})
    return FeatureStore(root / "feats"), rows


def _check_scores(scores, rows):
    assert set(scores) == {"val", "test"}
    for split in ("val", "test"):
        ids, image, maps = scores[split]["alpha"]
        assert ids == [r.id for r in rows if r.split == split]
        assert image.shape == (len(ids),) and maps.shape == (len(ids), SIZE, SIZE)
        assert torch.isfinite(image).all() and torch.isfinite(maps).all()


def test_split_holdout_never_uses_test(fake_store):
    _, rows = fake_store
    split = split_holdout(rows, "alpha", 0, "x", 0.25)
    assert split.has_holdout and len(split.holdout_anomalous) == 1 and len(split.train_anomalous) == 3
    assert len(split.holdout_normal) == 3 and len(split.train_normal) == 4
    used = split.train_normal + split.train_anomalous + split.holdout_normal + split.holdout_anomalous
    assert all(r.split != "test" for r in used)


def test_entry_points_on_fake_store(fake_store, clip, tmp_path):
    store, rows = fake_store
    mcfg = MultiProtoConfig(epochs=5, lr=0.01)
    models, report = train_multi_prototype(store, rows, clip, mcfg, SIZE)
    # 4 val anomalies, holdout_fraction 0.25 keeps 1 out of training: 3 images x 4 cells x 2 levels
    assert report["alpha"]["data"]["abnormal_patches"] == 3 * 4 * 2
    assert report["alpha"]["history"]["loss"][-1] < report["alpha"]["history"]["loss"][0]
    _check_scores(score_multi_prototype(store, rows, models, mcfg, SIZE), rows)

    _check_scores(score_image_prototypes(store, rows, fit_image_prototypes(store, rows), ImageProtoConfig(), SIZE),
                  rows)

    ccfg = CoopConfig(epochs=3, batch_size=256)
    learners, creport = train_prompt_clip(store, rows, clip, ccfg, SIZE)
    assert creport["alpha"]["history"]["criterion"] == "holdout_loss"
    save_prompt_clip(tmp_path / "coop.pt", learners["alpha"], clip.name, ccfg)
    anchors, _ = load_prompt_clip(tmp_path / "coop.pt", clip.name)
    assert torch.equal(anchors, learners["alpha"].anchors)
    _check_scores(score_prompt_clip(store, rows, {"alpha": anchors}, ccfg, SIZE), rows)

    vcfg, kcfg = VptConfig(epochs=3, num_defect_samples=2), KnnConfig(branch="visual", patch_aggregate=1)
    vmodels, vreport = train_vpt(store, rows, vcfg, kcfg.branch, kcfg.patch_aggregate, kcfg.patch_pad)
    assert vreport["alpha"]["criterion"] == "holdout_separability"
    assert vreport["alpha"]["split"]["defect_samples"] == 2
    from dataclasses import asdict

    from anomaly_core.kit.knn import knn_scores
    from anomaly_core.methods import get_method
    from anomaly_core.methods.base import Context

    vpt = get_method("vpt_knn")  # scored through the method interface: kNN on prompt-modulated patches
    ctx = Context(rows, store, vcfg, {"knn": asdict(kcfg)}, SIZE, 0, tmp_path)
    _check_scores(vpt.score(ctx, vmodels), rows)
    same = vpt.score(ctx, {"alpha": PromptModulator(torch.randn(3, 8), 0.0)})

    plain = knn_scores(store, rows, replace(kcfg, k=vcfg.k_neighbors), SIZE, 0)
    assert torch.allclose(same["test"]["alpha"][1], plain["test"]["alpha"][1])
