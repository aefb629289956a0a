"""Patch kNN (PatchCore / AnomalyDINO style): memory bank of normal patches, distance to nearest neighbours.

The search is exact and blocked over queries AND bank: a [q, m] block of squared distances is computed with one
`addmm` (norm trick) and folded into a running top-k, so peak memory is bounded by `KnnConfig.max_memory_mb`
whatever the bank size. The coreset is greedy k-center on a random projection whose min-distance vector is
updated by one matrix-vector product per pick. `knn.index: ivf` swaps the exact search for an inverted-file
search (k-means lists, `nprobe` lists probed per query) whose recall against exact is measured by `ivf_recall`;
`knn.index: faiss` runs the same exact search with faiss-cpu (optional extra).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch
from tqdm.auto import tqdm

from anomaly_core.config import Checks
from anomaly_core.data.holdout import shot_rows
from anomaly_core.data.manifest import Row, categories
from anomaly_core.errors import ConfigError
from anomaly_core.kit.maps import image_score_from_map, to_image_maps
from anomaly_core.kit.patches import patch_grid
from anomaly_core.kit.scores import Scores, score_splits
from anomaly_core.store import FeatureStore

BYTES = 4  # float32


@dataclass
class KnnConfig:
    branch: Literal["visual", "clip"] = "visual"
    k: int = 1
    patch_aggregate: int = 3
    patch_pad: Literal["exclude", "zeros", "replicate"] = "zeros"
    image_score: Literal["max", "topk_mean", "reweight"] = "reweight"
    top_percent: float = 1.0
    reweight_neighbors: int = 9
    coreset_ratio: float = 1.0
    coreset_dim: int = 128
    sigma: float = 4.0
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    chunk: int = 4096
    max_memory_mb: float = 256.0
    index: Literal["exact", "faiss", "ivf"] = "exact"
    ivf_lists: int = 0
    ivf_nprobe: int = 8

    def validate(self, section: str) -> None:
        Checks(section).positive(k=self.k, chunk=self.chunk, max_memory_mb=self.max_memory_mb,
                                 reweight_neighbors=self.reweight_neighbors, coreset_dim=self.coreset_dim,
                                 ivf_nprobe=self.ivf_nprobe) \
            .open_unit(coreset_ratio=self.coreset_ratio) \
            .that(0.0 < self.top_percent <= 100.0, "top_percent", self.top_percent, "must be in (0, 100] (a percent)") \
            .that(self.patch_aggregate >= 1 and self.patch_aggregate % 2 == 1, "patch_aggregate",
                  self.patch_aggregate, "an odd integer >= 1 (an even window shifts the maps by half a cell)") \
            .non_negative(sigma=self.sigma) \
            .that(self.ivf_lists >= 0, "ivf_lists", self.ivf_lists, "0 (automatic, 4 sqrt(M)) or a positive count") \
            .done()
        if self.index == "faiss":
            import importlib.util

            if importlib.util.find_spec("faiss") is None:
                raise ConfigError(f"{section}.index=faiss needs the faiss-cpu package: pip install 'anomaly_core[faiss]' "
                                  f"(or {section}.index=exact, the same neighbours with torch)")


# ----------------------------------------------------------------------------------------------- coreset


def _projection(bank: torch.Tensor, seed: int, proj_dim: int) -> tuple[torch.Tensor, torch.Generator]:
    """bank [M, D] -> (Gaussian random projection [M, min(D, proj_dim)], the generator after the draw)."""
    g = torch.Generator().manual_seed(seed)
    proj = bank.float()
    if bank.shape[1] > proj_dim:
        proj = proj @ (torch.randn(bank.shape[1], proj_dim, generator=g) / proj_dim**0.5)
    return proj.contiguous(), g


def _n_select(m: int, ratio: float) -> int:
    """Coreset size: int(m * ratio) as anomalib's KCenterGreedy (floor), at least one."""
    return max(1, int(m * ratio))


def greedy_coreset_reference(bank: torch.Tensor, ratio: float, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Slow reference greedy k-center (one `cdist` per pick). bank [M, D] -> indices [int(ratio M)]."""
    m = bank.shape[0]
    n = _n_select(m, ratio)
    if n >= m:
        return torch.arange(m)
    proj, g = _projection(bank, seed, proj_dim)
    first = int(torch.randint(m, (1,), generator=g))
    chosen = [first]
    mind = torch.cdist(proj, proj[first : first + 1]).squeeze(1)  # [M]
    for _ in range(n - 1):
        idx = int(mind.argmax())
        chosen.append(idx)
        mind = torch.minimum(mind, torch.cdist(proj, proj[idx : idx + 1]).squeeze(1))
    return torch.tensor(chosen)


def greedy_coreset(bank: torch.Tensor, ratio: float, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Greedy k-center subsampling (PatchCore) on a random projection. bank [M, D] -> indices [int(ratio M)].

    Same picks as `greedy_coreset_reference` (same projection and start), but the squared min-distance vector
    is updated in place by one `addmm` (||p||^2 - 2 p_i^T P^T, + ||p_i||^2) per pick against the transposed
    projection [p, M] (a row-vector times a contiguous matrix streams memory ~3x faster than `addmv` on [M, p]):
    O(M * proj_dim) memory traffic per pick, no temporaries, no Python work per bank row.
    """
    m = bank.shape[0]
    n = _n_select(m, ratio)
    if n >= m:
        return torch.arange(m)
    proj, g = _projection(bank, seed, proj_dim)  # [M, p]
    first = int(torch.randint(m, (1,), generator=g))
    with single_thread():  # thousands of tiny memory-bound steps: a thread barrier per op costs more than it gains
        return _greedy_picks(proj, first, n)


@contextmanager
def single_thread():
    """torch intra-op threads = 1 inside (restored after; nested uses keep 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _greedy_picks(proj: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """The greedy loop of `greedy_coreset`: proj [M, p], first pick -> indices [n]."""
    proj_t = proj.T.contiguous()  # [p, M]
    sq = (proj * proj).sum(1)[None]  # [1, M]
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = first
    mind = torch.addmm(sq, proj[first][None], proj_t, alpha=-2.0).add_(sq[0, first])  # [1, M] squared distances
    step = torch.empty_like(mind)
    for i in range(1, n):
        idx = int(mind.argmax())
        chosen[i] = idx
        torch.addmm(sq, proj[idx][None], proj_t, alpha=-2.0, out=step)
        step.add_(sq[0, idx])
        torch.minimum(mind, step, out=mind)
    return chosen


# ----------------------------------------------------------------------------------------------- exact search


BANK_BLOCK = 1024  # bank rows per block: the block (~0.6 MB at D=152) stays in L2; measured fastest on AVX2 CPUs
QUERY_BLOCK = 4096


def working_set_bytes(qb: int, mb: int, d: int, k: int) -> int:
    """Bytes the search allocates for one (query block, bank block) pair, besides the bank and the outputs.

    [qb, mb] distance block, [qb, d] float32 query copy, [qb] query norms, running [qb, k] values + indices,
    and for k > 1 the [qb, k + mb] merge (values, int64 candidate ids, topk outputs).
    """
    elems = qb * mb + qb * d + qb + qb * k * 3
    if k > 1:
        elems += qb * (k + mb) * 3 + qb * k * 3
    else:
        elems += qb * 4  # min values / indices / mask of the block
    return elems * BYTES


def block_sizes(q: int, m: int, d: int, k: int, max_memory_mb: float) -> tuple[int, int]:
    """(query block, bank block) whose `working_set_bytes` fit `max_memory_mb` (at least one row each).

    Prefers BANK_BLOCK bank rows and up to QUERY_BLOCK queries, halving the query block, then the bank block.
    """
    budget = max_memory_mb * 2**20
    qb, mb = max(1, min(q, QUERY_BLOCK)), max(1, min(m, BANK_BLOCK))
    while working_set_bytes(qb, mb, d, k) > budget and qb > 1:
        qb = max(1, qb // 2)
    while working_set_bytes(qb, mb, d, k) > budget and mb > 1:
        mb = max(1, mb // 2)
    return qb, mb


def knn_search(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, max_memory_mb: float = 256.0,
               bank_sq: torch.Tensor | None = None, blocks: tuple[int, int] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest bank rows of each query, blocked over queries and bank (running top-k across bank blocks).

    queries [Q, D], bank [M, D] -> (squared distances [Q, k] ascending, bank indices [Q, k]).
    `blocks` = (query rows, bank rows) overrides the sizes `block_sizes` derives from `max_memory_mb`.
    """
    k = min(k, bank.shape[0])
    bank = bank.float()
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)  # [M]
    q_total, d = queries.shape
    m = bank.shape[0]
    qb, mb = blocks or block_sizes(q_total, m, d, k, max_memory_mb)
    out_d = torch.empty(q_total, k)
    out_i = torch.empty(q_total, k, dtype=torch.long)
    for qs in range(0, q_total, qb):
        q = queries[qs : qs + qb].float()
        best_d = torch.full((q.shape[0], k), math.inf)
        best_i = torch.zeros(q.shape[0], k, dtype=torch.long)
        block = torch.empty(q.shape[0], min(mb, m))
        for ms in range(0, m, mb):
            me = min(ms + mb, m)
            blk = block[:, : me - ms]
            torch.addmm(bank_sq[None, ms:me], q, bank[ms:me].T, beta=1.0, alpha=-2.0, out=blk)  # ||b||^2 - 2 q.b
            if k == 1:
                val, idx = blk.min(dim=1, keepdim=True)
                better = val < best_d
                best_d = torch.where(better, val, best_d)
                best_i = torch.where(better, idx + ms, best_i)
            else:
                val, idx = torch.cat([best_d, blk], 1).topk(k, dim=1, largest=False, sorted=True)
                cand_i = torch.cat([best_i, torch.arange(ms, me).expand(q.shape[0], -1)], 1)
                best_d, best_i = val, cand_i.gather(1, idx)
        out_d[qs : qs + q.shape[0]] = (best_d + (q * q).sum(1, keepdim=True)).clamp_min_(0)
        out_i[qs : qs + q.shape[0]] = best_i
    return out_d, out_i


def knn_distance(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096,
                 max_memory_mb: float = 256.0) -> torch.Tensor:
    """Mean Euclidean distance of each query to its k nearest bank rows (exact). queries [Q, D], bank [M, D] -> [Q].

    `chunk` caps the query block (kept for callers of the old signature); memory is bounded by `max_memory_mb`.
    """
    parts = [knn_search(queries[s : s + chunk], bank, k, max_memory_mb)[0] for s in range(0, queries.shape[0], chunk)]
    return torch.cat(parts).sqrt().mean(1)


# ----------------------------------------------------------------------------------------------- IVF


def kmeans(x: torch.Tensor, n_lists: int, iters: int = 10, seed: int = 0, max_memory_mb: float = 256.0) -> torch.Tensor:
    """Lloyd's k-means. x [M, D] -> centroids [n_lists, D] (empty clusters keep their previous centroid)."""
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(x.shape[0], generator=g)[:n_lists]].float().clone()
    for _ in range(iters):
        assign = knn_search(x, cent, 1, max_memory_mb)[1][:, 0]  # [M]
        sums = torch.zeros_like(cent).index_add_(0, assign, x.float())
        counts = torch.bincount(assign, minlength=cent.shape[0]).float()
        nonempty = counts > 0
        cent[nonempty] = sums[nonempty] / counts[nonempty, None]
    return cent


class IvfIndex:
    """Inverted-file index: bank rows sorted by their k-means list; a query searches its `nprobe` nearest lists.

    Approximate: a true neighbour in an unprobed list is missed (recall against exact: `ivf_recall`).
    """

    def __init__(self, bank: torch.Tensor, n_lists: int, nprobe: int, seed: int = 0, max_memory_mb: float = 256.0):
        bank = bank.float()
        self.n_lists = max(1, min(n_lists, bank.shape[0]))
        self.nprobe = max(1, min(nprobe, self.n_lists))
        self.max_memory_mb = max_memory_mb
        g = torch.Generator().manual_seed(seed)
        sample = bank[torch.randperm(bank.shape[0], generator=g)[: 16 * self.n_lists]]  # k-means on <= 16 rows/list
        self.centroids = kmeans(sample, self.n_lists, iters=8, seed=seed, max_memory_mb=max_memory_mb)  # [L, D]
        assign = knn_search(bank, self.centroids, 1, max_memory_mb)[1][:, 0]  # [M]
        order = torch.argsort(assign, stable=True)
        self.sorted_bank, self.sorted_ids = bank[order].contiguous(), order  # [M, D], [M]
        counts = torch.bincount(assign, minlength=self.n_lists)
        self.starts = torch.cumsum(counts, 0) - counts  # [L]
        self.counts = counts

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (squared distances [Q, k], bank indices [Q, k]); inf / -1 where fewer than k found."""
        queries = queries.float()
        lists = knn_search(queries, self.centroids, self.nprobe, self.max_memory_mb)[1]  # [Q, nprobe]
        out_d = torch.full((queries.shape[0], k), math.inf)
        out_i = torch.full((queries.shape[0], k), -1, dtype=torch.long)
        # group queries by probed list: one exact search per (list, queries probing it)
        flat_q = torch.arange(queries.shape[0]).repeat_interleave(self.nprobe)
        flat_l = lists.reshape(-1)
        order = torch.argsort(flat_l, stable=True)
        flat_q, flat_l = flat_q[order], flat_l[order]
        bounds = torch.searchsorted(flat_l, torch.arange(self.n_lists + 1))
        for lst in range(self.n_lists):
            a, b = int(bounds[lst]), int(bounds[lst + 1])
            c = int(self.counts[lst])
            if a == b or c == 0:
                continue
            qi = flat_q[a:b]
            s = int(self.starts[lst])
            d, i = knn_search(queries[qi], self.sorted_bank[s : s + c], k, self.max_memory_mb)
            cand_d = torch.cat([out_d[qi], d], 1)  # [q, k + k']
            cand_i = torch.cat([out_i[qi], self.sorted_ids[s + i]], 1)
            val, pos = cand_d.topk(k, dim=1, largest=False, sorted=True)
            out_d[qi], out_i[qi] = val, cand_i.gather(1, pos)
        return out_d, out_i


def ivf_recall(queries: torch.Tensor, bank: torch.Tensor, index: IvfIndex, k: int = 1) -> float:
    """Fraction of the exact k nearest neighbours that the IVF search returns (recall@k)."""
    exact = knn_search(queries, bank, k)[1]
    approx = index.search(queries, k)[1]
    hits = (exact[:, :, None] == approx[:, None, :]).any(2).float()
    return float(hits.mean())


# ----------------------------------------------------------------------------------------------- PatchCore


Search = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (queries [Q, D], k) -> (d2 [Q, k], ids [Q, k])


def dense_search(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact search as ONE block: queries [Q, D], bank [M, D], bank_sq [M] -> (squared distances [Q, k]
    ascending, bank indices [Q, k]). The same arithmetic as one block of `knn_search` (`||b||^2 - 2 q.b` by
    `addmm`, then `+ ||q||^2`, clamped at 0), with no Python loop over data: the ONNX graph traces it."""
    d2 = torch.addmm(bank_sq[None], queries, bank.T, beta=1.0, alpha=-2.0)  # [Q, M]
    near, ids = d2.topk(min(k, bank.shape[0]), dim=1, largest=False)
    return (near + (queries * queries).sum(1, keepdim=True)).clamp_min(0), ids


def reweight_scores(patch_d: torch.Tensor, patch_nn: torch.Tensor, queries: torch.Tensor, bank: torch.Tensor,
                    n_neighbors: int, max_memory_mb: float = 256.0, search: Search | None = None) -> torch.Tensor:
    """PatchCore's image score (Roth et al. 2022, eq. 7; anomalib `compute_anomaly_score`).

    patch_d [N, P] nearest-neighbour distances, patch_nn [N, P] their bank indices, queries [N, P, D] -> [N]:
    s* = the largest patch distance, m* its nearest bank row, N_b(m*) the `n_neighbors` nearest bank rows of m*
    (m* itself first); s = (1 - softmax(||m_test* - N_b(m*)||)[0]) * s*. Gathers only (no Python indexing), so
    the ONNX graph traces this same function; `search` finds N_b (default: the blocked exact `knn_search`).
    """
    top = patch_d.argmax(1, keepdim=True)  # [N, 1]
    s_star = patch_d.gather(1, top)[:, 0]  # [N]
    n_b = min(n_neighbors, bank.shape[0])
    if n_b <= 1:
        return s_star
    bank = bank.float()
    m_star = bank[patch_nn.gather(1, top)[:, 0]]  # [N, D]
    search = search or (lambda q, k: knn_search(q, bank, k, max_memory_mb))
    support = search(m_star, n_b)[1]  # [N, n_b]
    q_star = queries.gather(1, top[:, :, None].expand(-1, 1, queries.shape[2]))[:, 0].float()  # [N, D]
    dist = torch.linalg.vector_norm(q_star[:, None] - bank[support], dim=-1)  # [N, n_b]
    return (1.0 - torch.softmax(dist, dim=1)[:, 0]) * s_star


def score_patches(grid: torch.Tensor, bank: torch.Tensor, cfg: KnnConfig, size: int, search: Search,
                  support: Search | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """THE kNN scoring of patch descriptors, shared by `PatchKnn.predict` and the ONNX graph (methods/knn/onnx.py):
    grid [N, h, w, D] against bank [M, D] with `search` -> (image scores [N], smoothed maps [N, size, size]).

    Patch score = mean distance to the `k` nearest bank rows; maps upsampled (`upsample`) and smoothed (`sigma`);
    image score "reweight" (PatchCore, over `reweight_neighbors` bank neighbours found by `support`, default the
    exact blocked search: an approximate index never picks the re-weighting support) or "max" / "topk_mean".
    """
    n, h, w, d = grid.shape
    queries = grid.reshape(n, h * w, d)
    d2, ids = search(queries.reshape(n * h * w, d), cfg.k)  # [Q, k] x 2
    dist = d2.sqrt().reshape(n, h * w, -1)  # [N, P, k]
    ids = ids.reshape(n, h * w, -1)
    maps = to_image_maps(dist.mean(2).reshape(n, h, w), size, cfg.sigma, cfg.upsample)
    if cfg.image_score == "reweight":
        image = reweight_scores(dist[:, :, 0], ids[:, :, 0], queries, bank, cfg.reweight_neighbors,
                                cfg.max_memory_mb, support)
    else:
        image = image_score_from_map(maps, cfg.image_score, cfg.top_percent)
    return image, maps


class FaissFlat:
    """Exact search with faiss-cpu's `IndexFlatL2` (optional dependency; `knn.index: faiss`): the same neighbours
    as `knn_search` up to ties, ~1.15x faster on a 2-core AVX2 CPU given 16k query rows per call (scripts/benchmark.py). faiss blocks the search
    itself (4096 queries x 1024 bank rows), so its working memory is bounded too."""

    def __init__(self, bank: torch.Tensor):
        import faiss

        self.index = faiss.IndexFlatL2(bank.shape[1])
        self.index.add(bank.float().contiguous().numpy())

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (squared distances [Q, k] ascending, bank indices [Q, k])."""
        d, i = self.index.search(queries.float().contiguous().numpy(), min(k, self.index.ntotal))
        return torch.from_numpy(d).clamp_min_(0), torch.from_numpy(i).long()


class PatchKnn:
    """Memory bank of normal patch descriptors [M, D] and the search settings of a `KnnConfig`.

    `PatchKnn.fit(normal_grid, cfg, seed)` builds the bank (optionally a greedy coreset);
    `distances(grid)` -> patch-grid distances [N, h, w]; `predict(grid, size)` -> (image [N], maps [N, S, S]).
    """

    def __init__(self, bank: torch.Tensor, cfg: KnnConfig, seed: int = 0):
        self.bank, self.cfg = bank.float().contiguous(), cfg  # [M, D]
        self.bank_sq = (self.bank * self.bank).sum(1)  # [M]
        self.index = None
        if cfg.index == "ivf":
            n_lists = cfg.ivf_lists or max(1, int(round(4 * math.sqrt(self.bank.shape[0]))))
            self.index = IvfIndex(self.bank, n_lists, cfg.ivf_nprobe, seed, cfg.max_memory_mb)
        elif cfg.index == "faiss":
            self.index = FaissFlat(self.bank)

    @classmethod
    def fit_each(cls, grids: dict[str, Callable[[], torch.Tensor]], cfg: KnnConfig, seed: int = 0
                 ) -> Iterator[tuple[str, "PatchKnn"]]:
        """(name, PatchKnn.fit(grid(), cfg, seed)) for several banks (e.g. one per category), identical to fitting
        them one by one. Without a coreset they are built lazily, one at a time (full banks can be large). With a
        coreset, the greedy selections (single-threaded, memory-bound) run concurrently, one per torch thread
        (1.3x faster for two 61k-patch banks on 2 cores), keeping only the selected rows."""
        if cfg.coreset_ratio >= 1.0 or len(grids) < 2:
            yield from ((name, cls.fit(grid(), cfg, seed)) for name, grid in grids.items())
            return

        def select(grid: Callable[[], torch.Tensor]) -> torch.Tensor:
            g = grid()
            bank = g.reshape(-1, g.shape[-1]).float()  # [M, D]
            return bank[greedy_coreset(bank, cfg.coreset_ratio, seed, cfg.coreset_dim)]

        workers = torch.get_num_threads()
        with single_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
            banks = dict(zip(grids, pool.map(select, grids.values())))
        yield from ((name, cls(bank, cfg, seed)) for name, bank in banks.items())

    @classmethod
    def fit(cls, normal_grid: torch.Tensor, cfg: KnnConfig, seed: int = 0) -> "PatchKnn":
        """normal_grid [N, h, w, D] -> a PatchKnn whose bank is all N*h*w patches (or their coreset)."""
        bank = normal_grid.reshape(-1, normal_grid.shape[-1]).float()  # [M, D]
        if cfg.coreset_ratio < 1.0:
            bank = bank[greedy_coreset(bank, cfg.coreset_ratio, seed, cfg.coreset_dim)]
        return cls(bank, cfg, seed)

    def _search_flat(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (squared distances [Q, k], bank indices [Q, k]) with the configured index."""
        if self.index is not None:
            return self.index.search(queries, k)
        return knn_search(queries, self.bank, k, self.cfg.max_memory_mb, self.bank_sq)

    def _rows_per_call(self, hw: int) -> int:
        """Query rows per search call: the patches of as many whole images as fit `cfg.chunk` rows (the search
        bounds its own memory). faiss gets 4x more: its BLAS path is ~1.4x faster on 16k query rows than on 4k
        (its own blocks bound the memory, the result is [Q, k])."""
        rows = self.cfg.chunk * (4 if self.cfg.index == "faiss" else 1)
        return max(1, rows // max(hw, 1)) * hw

    def batched_search(self, hw: int, progress: bool = False) -> Search:
        """The `Search` of this bank over query blocks of whole images of `hw` patches, with a progress bar."""
        def search(queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            step = self._rows_per_call(hw)
            if queries.shape[0] <= step:
                return self._search_flat(queries, k)
            parts = [self._search_flat(queries[s : s + step], k)
                     for s in tqdm(range(0, queries.shape[0], step), desc="knn", leave=False, disable=not progress)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        return search

    def search(self, grid: torch.Tensor, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [N, h, w, D] -> (squared distances [N, h*w, k], bank indices [N, h*w, k])."""
        n, h, w, d = grid.shape
        d2, ids = self.batched_search(h * w, progress)(grid.reshape(-1, d), self.cfg.k)
        return d2.reshape(n, h * w, -1), ids.reshape(n, h * w, -1)

    def distances(self, grid: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """grid [N, h, w, D] -> mean distance to the k nearest bank patches [N, h, w]."""
        n, h, w, _ = grid.shape
        d2, _ = self.search(grid, progress)
        return d2.sqrt().mean(2).reshape(n, h, w)

    def predict(self, grid: torch.Tensor, size: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [N, h, w, D] -> (image scores [N], smoothed pixel maps [N, size, size]) by `score_patches`."""
        exact = lambda q, k: knn_search(q, self.bank, k, self.cfg.max_memory_mb, self.bank_sq)
        return score_patches(grid, self.bank, self.cfg, size, self.batched_search(grid.shape[1] * grid.shape[2], progress),
                             exact)


# ----------------------------------------------------------------------------------------------- scoring loop


Transform = Callable[[str, torch.Tensor], torch.Tensor]  # (category, grid [N, h, w, D]) -> [N, h, w, D']


def check_tiled(cfg: KnnConfig, tiling, section: str = "tiling") -> None:
    """One-line refusals (ConfigError) of the settings the tiled kNN (`kit/tiled_knn.py`, `kit.tiling.TilingConfig`
    `tiling`) does not support."""
    if cfg.branch != "visual":
        raise ConfigError(f"{section}.enabled=true needs knn.branch=visual (got {cfg.branch}): CLIP tokens are not tiled")
    if tiling.position_aware and cfg.image_score == "reweight":
        raise ConfigError(f"{section}.position_aware=true with knn.image_score=reweight: the re-weighting needs one bank "
                          "(set knn.image_score to max or topk_mean)")


def knn_scores(store: FeatureStore, rows: Sequence[Row], cfg: KnnConfig, size: int, seed: int,
               progress: bool = False, transform: Transform | None = None) -> Scores:
    """Patch kNN of val and test images against each category's k-shot bank. `transform(category, grid)` maps
    the patch grids of bank and queries alike before the search (visual prompt tuning is such a transform)."""
    def grids(cat: str, part: Sequence[Row]) -> torch.Tensor:  # [N, h, w, D]
        grid = patch_grid(store, cfg.branch, part, cfg.patch_aggregate, cfg.patch_pad)
        return transform(cat, grid) if transform is not None else grid

    # one bank per category, in score_splits' category order: built lazily one at a time, or with a coreset all
    # selections concurrently (see PatchKnn.fit_each)
    banks = PatchKnn.fit_each({c: (lambda c=c: grids(c, shot_rows(rows, c))) for c in categories(rows)}, cfg, seed)
    bank: dict[str, PatchKnn] = {}  # the current category's bank only

    def prepare(cat: str) -> None:
        name, knn = next(banks)
        assert name == cat, (name, cat)
        bank.clear()
        bank[cat] = knn

    return score_splits(rows, lambda cat, part: bank[cat].predict(grids(cat, part), size, progress), prepare)
