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
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anomaly_core.config import KnnConfig
from anomaly_core.scoring.maps import image_score_from_map, to_image_maps

BYTES = 4  # float32


def cnn_patches(levels: list[torch.Tensor], aggregate: int = 3, pad_mode: str = "zeros") -> torch.Tensor:
    """Multi-scale CNN maps -> patch descriptors on the finest grid.

    levels: [N, C_j, h_j, w_j] -> [N, h, w, sum C_j]; each level is locally averaged (`aggregate` x `aggregate`,
    PatchCore's neighbourhood) and bilinearly upsampled to the finest grid. `pad_mode` sets the border of the
    averaging: "exclude" averages the in-image cells only, "zeros" counts zero padding (anomalib's
    `AvgPool2d(3, 1, 1)`), "replicate" repeats the edge cells.
    """
    h = max(l.shape[-2] for l in levels)
    w = max(l.shape[-1] for l in levels)
    out = []
    for lvl in levels:
        x = lvl.float()
        if aggregate > 1:
            p = aggregate // 2
            if pad_mode == "replicate":
                x = F.avg_pool2d(F.pad(x, (p, p, p, p), mode="replicate"), aggregate, stride=1)
            else:
                x = F.avg_pool2d(x, aggregate, stride=1, padding=p, count_include_pad=pad_mode == "zeros")
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        out.append(x)
    return torch.cat(out, dim=1).permute(0, 2, 3, 1).contiguous()


def clip_patches(levels: list[torch.Tensor], grid: int) -> torch.Tensor:
    """CLIP level tokens [N, L, E] per level -> [N, g, g, levels*E] of per-level L2-normalised tokens."""
    toks = [F.normalize(l.float(), dim=-1) for l in levels]
    x = torch.cat(toks, dim=-1)
    return x.reshape(x.shape[0], grid, grid, -1)


# ----------------------------------------------------------------------------------------------- coreset


def _projection(bank: torch.Tensor, seed: int, proj_dim: int) -> tuple[torch.Tensor, torch.Generator]:
    """bank [M, D] -> (Gaussian random projection [M, min(D, proj_dim)], the generator after the draw)."""
    g = torch.Generator().manual_seed(seed)
    proj = bank.float()
    if bank.shape[1] > proj_dim:
        proj = proj @ (torch.randn(bank.shape[1], proj_dim, generator=g) / proj_dim**0.5)
    return proj.contiguous(), g


def _n_select(m: int, ratio: float) -> int:
    return max(1, int(round(m * ratio)))


def greedy_coreset_reference(bank: torch.Tensor, ratio: float, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Slow reference greedy k-center (one `cdist` per pick). bank [M, D] -> indices [round(ratio M)]."""
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
    """Greedy k-center subsampling (PatchCore) on a random projection. bank [M, D] -> indices [round(ratio M)].

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


def reweight_scores(patch_d: torch.Tensor, patch_nn: torch.Tensor, queries: torch.Tensor, bank: torch.Tensor,
                    n_neighbors: int, max_memory_mb: float = 256.0) -> torch.Tensor:
    """PatchCore's image score (Roth et al. 2022, eq. 7; anomalib `compute_anomaly_score`).

    patch_d [N, P] nearest-neighbour distances, patch_nn [N, P] their bank indices, queries [N, P, D] -> [N]:
    s* = the largest patch distance, m* its nearest bank row, N_b(m*) the `n_neighbors` nearest bank rows of m*
    (m* itself first); s = (1 - softmax(||m_test* - N_b(m*)||)[0]) * s*.
    """
    n = patch_d.shape[0]
    top = patch_d.argmax(1)  # [N]
    rows = torch.arange(n)
    s_star = patch_d[rows, top]  # [N]
    if n_neighbors <= 1:
        return s_star
    m_star = bank[patch_nn[rows, top]].float()  # [N, D]
    support = knn_search(m_star, bank, min(n_neighbors, bank.shape[0]), max_memory_mb)[1]  # [N, n_b]
    q_star = queries[rows, top].float()  # [N, D]
    dist = torch.linalg.vector_norm(q_star[:, None] - bank[support].float(), dim=-1)  # [N, n_b]
    w = 1.0 - torch.softmax(dist, dim=1)[:, 0]
    return w * s_star


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

    def _images_per_block(self, hw: int) -> int:
        """Images whose patches go through one search call (`cfg.chunk` query rows; the search bounds memory).
        faiss gets 4x more: its BLAS path is ~1.4x faster on 16k query rows than on 4k (its own blocks bound the
        memory, the result is [Q, k])."""
        rows = self.cfg.chunk * (4 if self.cfg.index == "faiss" else 1)
        return max(1, rows // max(hw, 1))

    def search(self, grid: torch.Tensor, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [N, h, w, D] -> (squared distances [N, h*w, k], bank indices [N, h*w, k]), batched over images."""
        n, h, w, d = grid.shape
        step = self._images_per_block(h * w)
        ds, ids = [], []
        for s in tqdm(range(0, n, step), desc="knn", leave=False, disable=not progress):
            q = grid[s : s + step].reshape(-1, d)
            if self.index is not None:
                dd, ii = self.index.search(q, self.cfg.k)
            else:
                dd, ii = knn_search(q, self.bank, self.cfg.k, self.cfg.max_memory_mb, self.bank_sq)
            ds.append(dd.reshape(-1, h * w, dd.shape[1]))
            ids.append(ii.reshape(-1, h * w, ii.shape[1]))
        if not ds:
            return torch.zeros(0, h * w, self.cfg.k), torch.zeros(0, h * w, self.cfg.k, dtype=torch.long)
        return torch.cat(ds), torch.cat(ids)

    def distances(self, grid: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """grid [N, h, w, D] -> mean distance to the k nearest bank patches [N, h, w]."""
        n, h, w, _ = grid.shape
        d2, _ = self.search(grid, progress)
        return d2.sqrt().mean(2).reshape(n, h, w)

    def predict(self, grid: torch.Tensor, size: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [N, h, w, D] -> (image scores [N], smoothed pixel maps [N, size, size]).

        image_score "max" / "topk_mean" read the smoothed map; "reweight" is PatchCore's neighbour re-weighting
        of the largest patch distance over `reweight_neighbors` bank neighbours.
        """
        n, h, w, d = grid.shape
        d2, ids = self.search(grid, progress)
        dist = d2.sqrt()  # [N, P, k]
        patch = dist.mean(2)  # [N, P]
        maps = to_image_maps(patch.reshape(n, h, w), size, self.cfg.sigma, self.cfg.upsample)
        if self.cfg.image_score == "reweight":
            image = reweight_scores(dist[:, :, 0], ids[:, :, 0], grid.reshape(n, h * w, d), self.bank,
                                    self.cfg.reweight_neighbors, self.cfg.max_memory_mb)
        else:
            image = image_score_from_map(maps, self.cfg.image_score, self.cfg.top_percent)
        return image, maps
