"""Regression tests of the fidelity fixes (issue 18): our code vs small reference tensors that the official
implementations produced (tests/fixtures/fidelity/*.pt, made by `scripts/fidelity/run.py --fixtures
tests/fixtures/fidelity`; each file's `note` says how). No official code, no network."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIX = Path(__file__).parent / "fixtures" / "fidelity"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def musc():
    return torch.load(FIX / "musc.pt", weights_only=False)


def test_musc_msm_interval_mean_matches_official(musc):
    from anomaly_core.methods.musc.mutual import mutual_scores

    inp, off = musc["inputs"], musc["official"]
    n, p, e = next(iter(off["lnamd"].values())).shape
    g = int(p ** 0.5)
    ours = torch.stack([mutual_scores(off["lnamd"][k].reshape(n, g, g, e), inp["topmin"]).reshape(n, -1)
                        for k in off["msm"]])
    assert _rel(ours, torch.stack(list(off["msm"].values()))) < 1e-4


def test_musc_rscin_matches_official(musc):
    from anomaly_core.methods.musc.mutual import rescore

    inp, off = musc["inputs"], musc["official"]
    s = off["image"].double()
    s01 = ((s - s.min()) / (s.max() - s.min())).float()  # the official RsCIN min-max normalises first
    assert _rel(rescore(s01, inp["cls"], inp["k_list"]), off["rscin"]) < 1e-4
    # the weighted mean commutes with the min-max map: raw scores rank (and rescale) the same
    raw = rescore(s.float(), inp["cls"], inp["k_list"]).double()
    assert _rel((raw - s.min()) / (s.max() - s.min()), off["rscin"]) < 1e-4


def test_musc_lnamd_and_clip_patch_scores_match_official(musc):
    from anomaly_core.methods.musc import clip_patch_scores, musc_clip_levels

    inp, off = musc["inputs"], musc["official"]
    levels = [t[:, 1:] for t in inp["tokens"]]  # our CLIP store keeps the grid tokens (no CLS)
    n, p, e = levels[0].shape
    g = int(p ** 0.5)
    for r in inp["r_list"]:
        for l, ours in enumerate(musc_clip_levels(levels, g, r)):
            assert _rel(ours.reshape(n, p, e), off["lnamd"][(r, l)]) < 1e-4, (r, l)
    assert _rel(clip_patch_scores(levels, g, inp["r_list"], inp["topmin"]).reshape(n, -1), off["patch"]) < 1e-4


@pytest.fixture(scope="module")
def knn():
    return torch.load(FIX / "knn.pt", weights_only=False)


def test_knn_coreset_size_picks_and_scores_match_anomalib(knn):
    from anomaly_core.kit.knn import _greedy_picks, _n_select, knn_search, reweight_scores
    from anomaly_core.kit.patches import cnn_patches

    inp, off = knn["inputs"], knn["official"]
    train, test = cnn_patches(inp["train"], 3, "zeros"), cnn_patches(inp["test"], 3, "zeros")
    assert _rel(torch.cat([train, test]), torch.cat([off["grid_train"], off["grid_test"]]).permute(0, 2, 3, 1)) < 1e-5
    m = train.shape[0] * train.shape[1] * train.shape[2]
    assert _n_select(m, inp["ratio"]) == off["coreset_size"]  # int(M * ratio), as anomalib's KCenterGreedy
    assert torch.equal(_greedy_picks(off["proj"].float(), int(off["picks"][0]), off["coreset_size"]), off["picks"])
    bank = train.reshape(m, -1)[off["picks"]]
    q = test.reshape(test.shape[0], -1, test.shape[-1])
    d2, ids = knn_search(q.reshape(-1, q.shape[-1]), bank, 1)
    patch = d2.sqrt().reshape(q.shape[0], -1)
    assert _rel(patch, off["patch"]) < 1e-4
    assert _rel(reweight_scores(patch, ids.reshape(q.shape[0], -1), q, bank, 9), off["image"]) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# issue 18 (b): zero-shot vs anomalib WinClip, CoOp vs PromptAD, kNN on DINO tokens vs AnomalyDINO. Fixtures made by
# scripts/fidelity/run.py --only zero_shot_clip,prompt_clip,knn --fixtures tests/fixtures/fidelity (check_winclip.py,
# check_promptad.py, check_dino.py); the CLIP ones on the demo's tiny CLIP, whose random weights are rebuilt here.

@pytest.fixture(scope="module")
def tiny_clip():
    from anomaly_core.backbones.clip import TINY_CLIP, ClipBackbone

    return ClipBackbone(TINY_CLIP, "random", levels=[4])


def test_winclip_text_embeddings_and_patch_scores_match_anomalib(tiny_clip):
    from anomaly_core.backbones import preprocess
    from anomaly_core.kit.anchors import anomaly_probs

    fx = torch.load(FIX / "winclip.pt", weights_only=False)
    clip, prompts = tiny_clip, fx["normal"] + fx["anomalous"]
    tok = clip.tokenize(prompts)
    assert torch.equal(tok[:, :16], fx["tokens"])
    with torch.no_grad():
        emb = clip.encode_text(tok)
        assert _rel(emb, fx["prompt_embeddings"]) < 1e-4
        n = len(fx["normal"])  # WinCLIP's ensemble: mean of the raw prompt embeddings
        assert _rel(torch.stack([emb[:n].mean(0), emb[n:].mean(0)]), fx["text_embeddings"]) < 1e-4
        feats = clip(preprocess(fx["images_uint8"], clip.image_size, clip.mean, clip.std))
        anchors = torch.nn.functional.normalize(fx["text_embeddings"], dim=-1)
        t = fx["temperature"]
        assert _rel(feats["global"], fx["image_embeddings"]) < 1e-4
        assert _rel(feats["levels"][0], fx["patch_embeddings"]) < 1e-4
        assert _rel(anomaly_probs(feats["global"][:, None], anchors, t)[:, 0], fx["image_scores"]) < 1e-4
        assert _rel(anomaly_probs(feats["levels"][0], anchors, t), fx["patch_scores"]) < 1e-4


def test_winclip_prompt_lists_differ_as_documented():
    from anomaly_core.kit.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, build_prompts

    lists = torch.load(FIX / "winclip.pt", weights_only=False)["lists"]
    assert set(NORMAL_STATES) == set(lists["normal_states"]) - {"{} without damage"}
    assert set(lists["anomalous_states"]) < set(ABNORMAL_STATES) and len(ABNORMAL_STATES) == 10
    assert set(TEMPLATES) - set(lists["templates"]) == {"a cropped photo of a {}."}
    assert len(lists["templates"]) == 21 and len(set(lists["templates"])) == 20  # one template listed twice
    assert [len(p) for p in build_prompts("washer")] == [6 * 7, 10 * 7]


def test_promptad_prompt_features_match_through_our_embed_hook():
    import open_clip

    from anomaly_core.backbones.clip import ClipBackbone
    from anomaly_core.methods.prompt_clip.coop import PromptLearner

    fx = torch.load(FIX / "promptad.pt", weights_only=False)
    open_clip.add_model_config(FIX / "fidelity-tiny-clip12.json")  # 12 vision layers: PromptAD's tower needs them
    tiny_clip = ClipBackbone("fidelity-tiny-clip12", "random", levels=[1])
    learner = PromptLearner(tiny_clip, fx["class_name"], n_ctx=fx["n_ctx"])
    learner.ctx = torch.nn.Parameter(fx["inputs"]["normal_ctx"][0].clone())
    with torch.no_grad():
        for key in ("normal", "abnormal_handle"):
            ids = tiny_clip.tokenize(fx["texts"][key])
            assert torch.equal(ids, fx["tokens"][key])
            learner.token_ids, learner.groups = ids, torch.zeros(ids.shape[0], dtype=torch.long)
            assert _rel(tiny_clip.encode_text(ids, embed_hook=learner.embed_hook), fx["features"][key]) < 1e-4, key


def test_knn_on_dino_tokens_matches_anomalydino_distances_and_maps():
    from anomaly_core.kit.knn import knn_search
    from anomaly_core.kit.maps import to_image_maps

    fx = torch.load(FIX / "dino.pt", weights_only=False)
    inp, off = fx["inputs"], fx["official"]
    ref, test, (g, _) = inp["ref"].float(), inp["test"].float(), inp["grid"]
    d2, _ = knn_search(torch.nn.functional.normalize(test.reshape(-1, test.shape[-1]), dim=-1),
                       torch.nn.functional.normalize(ref.reshape(-1, ref.shape[-1]), dim=-1), 1)
    d = (d2[:, 0] / 2).reshape(test.shape[:2])  # 1 - cos, AnomalyDINO's L2_normalized distance
    assert _rel(d, off["patch"]) < 1e-4
    assert _rel(to_image_maps(d.reshape(-1, g, g), inp["size"], 4.0), off["map"]) < 1e-3
    k = max(int(g * g * 0.01), 1)
    assert _rel(d.topk(k, dim=1).values.mean(1), off["image"]) < 1e-4
