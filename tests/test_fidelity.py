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
