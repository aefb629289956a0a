"""Patch kNN: blocked exact search vs torch.cdist, memory-bounded blocks, coreset vs the slow reference,
PatchCore re-weighting vs a hand computation, IVF recall, the PatchKnn contract."""
from __future__ import annotations

import pytest
import torch

from anomaly_core.config import build
from anomaly_core.errors import ConfigError
from anomaly_core.kit.knn import (
    IvfIndex,
    KnnConfig,
    PatchKnn,
    block_sizes,
    greedy_coreset,
    greedy_coreset_reference,
    ivf_recall,
    knn_distance,
    knn_search,
    reweight_scores,
    working_set_bytes,
)
from anomaly_core.kit.patches import cnn_patches


def _data(q: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randn(m, d, generator=g)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("blocks", [(7, 13), (1, 1), (36, 210), (37, 211), (100, 1000)])  # odd, ragged, whole
def test_blocked_search_equals_cdist(k: int, blocks: tuple[int, int]) -> None:
    queries, bank = _data(37, 211, 5)
    d2, idx = knn_search(queries, bank, k, blocks=blocks)
    ref = torch.cdist(queries.double(), bank.double())  # [Q, M]
    ref_d, ref_i = ref.topk(k, dim=1, largest=False)
    torch.testing.assert_close(d2.double().sqrt(), ref_d, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, ref_i)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("budget_mb", [0.003, 0.02, 256.0])  # 3 KB / 20 KB: many budget-derived blocks
def test_knn_distance_under_budget_equals_cdist(k: int, budget_mb: float) -> None:
    queries, bank = _data(37, 211, 5, seed=2)
    ref_d = torch.cdist(queries.double(), bank.double()).topk(k, dim=1, largest=False).values
    dist = knn_distance(queries, bank, k, chunk=10, max_memory_mb=budget_mb)
    torch.testing.assert_close(dist.double(), ref_d.mean(1), atol=1e-4, rtol=1e-4)


def test_blocks_cover_whole_bank_within_budget() -> None:
    queries, bank = _data(9, 1000, 3, seed=1)
    bank[-1] = queries[4]  # the nearest row of query 4 is the very last bank row
    bank[0] = queries[7]  # ... and of query 7 the very first
    budget = 0.002  # 2 KB
    qb, mb = block_sizes(9, 1000, 3, 1, budget)
    assert working_set_bytes(qb, mb, 3, 1) <= budget * 2**20
    assert 1000 % mb != 0 or mb < 1000  # several bank blocks
    d2, idx = knn_search(queries, bank, 1, budget)
    assert int(idx[4, 0]) == 999 and int(idx[7, 0]) == 0
    assert float(d2[4, 0]) < 1e-5
    for k in (1, 9):
        for budget_mb in (0.01, 1.0, 64.0):
            qb, mb = block_sizes(5000, 200_000, 152, k, budget_mb)
            assert qb >= 1 and mb >= 1
            assert working_set_bytes(qb, mb, 152, k) <= budget_mb * 2**20 or (qb, mb) == (1, 1)


@pytest.mark.parametrize("m,d,ratio,seed", [(300, 6, 0.1, 0), (257, 200, 0.2, 3), (50, 4, 1.0, 0)])
def test_coreset_equals_reference(m: int, d: int, ratio: float, seed: int) -> None:
    bank = torch.randn(m, d, generator=torch.Generator().manual_seed(seed))
    fast = greedy_coreset(bank, ratio, seed, proj_dim=128)  # d=200 > 128 exercises the projection
    ref = greedy_coreset_reference(bank, ratio, seed, proj_dim=128)
    assert torch.equal(fast, ref)
    assert len(set(fast.tolist())) == len(fast) == max(1, int(m * ratio))  # anomalib KCenterGreedy size


def test_coreset_is_k_center_on_planted_clusters() -> None:
    # 4 tight, far-apart clusters: 4 picks must take one point of each
    centres = torch.tensor([[0.0, 0], [100, 0], [0, 100], [100, 100]])
    bank = (centres[:, None] + 0.01 * torch.randn(4, 25, 2)).reshape(100, 2)
    picks = greedy_coreset(bank, 0.04, seed=0)
    assert sorted(int(i) // 25 for i in picks) == [0, 1, 2, 3]


def test_reweight_against_hand_computation() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    # one image, three patches; patch 1 is the farthest from the bank
    queries = torch.tensor([[[0.1, 0.0], [0.0, -3.0], [0.9, 0.0]]])
    d2, ids = knn_search(queries[0], bank, 1)
    dist, nn = d2.sqrt().T, ids.T  # [1, 3]
    score = reweight_scores(dist, nn, queries, bank, n_neighbors=3)
    # by hand: s* = 3 (patch [0,-3] to bank row 0); N_3(m* = [0,0]) = rows 0, 1, 2 (distances 0, 1, 2)
    # distances of [0,-3] to rows 0, 1, 2: 3, sqrt(10), 5; weight = 1 - e^3 / (e^3 + e^sqrt(10) + e^5)
    e = torch.exp(torch.tensor([3.0, 10.0**0.5, 5.0]))
    expected = (1 - e[0] / e.sum()) * 3.0
    torch.testing.assert_close(score, expected.reshape(1), atol=1e-5, rtol=1e-5)
    assert torch.equal(reweight_scores(dist, nn, queries, bank, n_neighbors=1), torch.tensor([3.0]))


def test_ivf_recall_path() -> None:
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(8, 6, generator=g)
    bank = (centres[:, None] + torch.randn(8, 100, 6, generator=g)).reshape(800, 6)
    queries = (centres[:, None] + torch.randn(8, 10, 6, generator=g)).reshape(80, 6)
    full = IvfIndex(bank, n_lists=8, nprobe=8)  # probing every list is exact
    assert ivf_recall(queries, bank, full, k=3) == 1.0
    d_full, _ = full.search(queries, 3)
    torch.testing.assert_close(d_full, knn_search(queries, bank, 3)[0], atol=1e-4, rtol=1e-4)
    one = IvfIndex(bank, n_lists=16, nprobe=1)
    r = ivf_recall(queries, bank, one, k=1)
    assert 0.5 < r <= 1.0


def test_patch_knn_contract_and_config() -> None:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(3, 4, 4, 5, generator=g)
    test = torch.cat([normal[:1], normal[:1] + 5.0])  # an image equal to a normal one, and a shifted one
    cfg = build(KnnConfig, {"sigma": 0.0, "max_memory_mb": 0.01}, "knn")
    knn = PatchKnn.fit(normal, cfg, seed=0)
    assert knn.bank.shape == (48, 5)
    dist = knn.distances(test)
    # norm trick: sqrt of a float32 cancellation, ~1e-3 * |x| for identical rows
    assert dist.shape == (2, 4, 4) and float(dist[0].abs().max()) < 1e-2 and float(dist[1].min()) > 1.0
    image, maps = knn.predict(test, 8)
    assert maps.shape == (2, 8, 8) and image[1] > image[0]
    rw = PatchKnn.fit(normal, build(KnnConfig, {"image_score": "reweight", "coreset_ratio": 0.5, "sigma": 0.0}, "knn"), 0)
    assert rw.bank.shape[0] == 24
    image, _ = rw.predict(test, 8)
    assert image.shape == (2,) and image[1] > image[0]
    with pytest.raises(ConfigError, match="knn.max_memory_mb"):
        build(KnnConfig, {"max_memory_mb": 0}, "knn")
    with pytest.raises(ConfigError, match="knn.index"):
        build(KnnConfig, {"index": "hnsw"}, "knn")


def test_cnn_patches_padding_modes() -> None:
    x = torch.ones(1, 1, 4, 4)
    inner = cnn_patches([x], 3, "exclude")
    zeros = cnn_patches([x], 3, "zeros")
    rep = cnn_patches([x], 3, "replicate")
    assert torch.allclose(inner, torch.ones_like(inner)) and torch.allclose(rep, torch.ones_like(rep))
    assert float(zeros[0, 0, 0, 0]) == pytest.approx(4 / 9) and float(zeros[0, 0, 1, 0]) == pytest.approx(6 / 9)
    assert float(zeros[0, 1, 1, 0]) == pytest.approx(1.0)


def test_faiss_index_same_neighbours_and_scores_as_torch() -> None:
    """`knn.index: faiss` (optional faiss-cpu) finds the same neighbours as the torch kernel and cdist, and a
    PatchKnn with it predicts the same scores; without faiss the config names the extra to install."""
    pytest.importorskip("faiss", reason="faiss-cpu is the optional [faiss] extra (CI installs it)")
    from anomaly_core.kit.knn import FaissFlat

    queries, bank = _data(57, 403, 9, seed=3)
    d2, idx = FaissFlat(bank).search(queries, 4)
    ref_d, ref_i = torch.cdist(queries.double(), bank.double()).topk(4, dim=1, largest=False)
    torch.testing.assert_close(d2.double().sqrt(), ref_d, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, ref_i)
    g = torch.Generator().manual_seed(1)
    normal, test = torch.randn(4, 5, 5, 6, generator=g), torch.randn(3, 5, 5, 6, generator=g) * 1.5
    for raw in ({"sigma": 0.0}, {"sigma": 0.0, "image_score": "reweight", "k": 3}):
        exact = PatchKnn.fit(normal, build(KnnConfig, raw, "knn")).predict(test, 10)
        fast = PatchKnn.fit(normal, build(KnnConfig, {**raw, "index": "faiss"}, "knn")).predict(test, 10)
        for a, b in zip(exact, fast):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_faiss_index_without_faiss_names_the_extra(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    with pytest.raises(ConfigError, match=r"knn.index=faiss needs the faiss-cpu package: pip install 'anomaly_core\[faiss\]'"):
        build(KnnConfig, {"index": "faiss"}, "knn")


def test_fit_each_concurrent_coresets_equal_one_by_one() -> None:
    """Several coreset banks selected concurrently (one per torch thread) are the banks `PatchKnn.fit` picks one by
    one; the exact path builds them lazily; the torch thread count is restored."""
    g = torch.Generator().manual_seed(5)
    grids = {c: torch.randn(3, 6, 6, 10, generator=g) for c in ("a", "b", "c")}
    threads = torch.get_num_threads()
    for ratio in (0.2, 1.0):
        cfg = build(KnnConfig, {"coreset_ratio": ratio, "coreset_dim": 4}, "knn")
        got = dict(PatchKnn.fit_each({c: (lambda c=c: grids[c]) for c in grids}, cfg, seed=3))
        assert list(got) == ["a", "b", "c"]
        for c, grid in grids.items():
            assert torch.equal(got[c].bank, PatchKnn.fit(grid, cfg, seed=3).bank), (ratio, c)
        assert torch.get_num_threads() == threads
    calls = []
    lazy = PatchKnn.fit_each({c: (lambda c=c: calls.append(c) or grids[c]) for c in grids},
                             build(KnnConfig, {}, "knn"))
    assert next(lazy)[0] == "a" and calls == ["a"]  # one full bank at a time
