"""MuSc maths (Li et al., ICLR 2024): zero-shot mutual scoring of unlabeled images.

* LNAMD: patch descriptors aggregated over r x r neighbourhoods for several r (the caller builds one grid per r);
* MSM: a patch of image i gets, for every other image j, the distance to its nearest patch in j; these N - 1
  distances are sorted and the lowest `topmin` share is averaged (normal patches find close matches in most
  images, a defect patch in few or none);
* RsCIN: image scores re-scored by the cosine-weighted mean over each image's k most similar images (global
  features, itself included), averaged over several k.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


BYTES = 4  # float32


def interval_count(m: int, topmin: float) -> int:
    """How many of `m` distances the interval mean averages: max(1, int(topmin * m)) (the official MSM's count:
    floor, e.g. 2 of 9 at topmin 0.3, not round's 3; at least one where the official would average none)."""
    return max(1, int(topmin * m))


def interval_mean(dist: torch.Tensor, topmin: float, count: int | None = None) -> torch.Tensor:
    """[..., M] -> [...]: mean of the smallest `count` values (default interval_count(M, topmin))."""
    k = interval_count(dist.shape[-1], topmin) if count is None else count
    return dist.topk(k, dim=-1, largest=False).values.mean(-1)


def working_set_bytes(rows: int, chunk: int, n: int, p: int, topmin: float, query: int | None = None) -> int:
    """Bytes the pair loop allocates for a block of `rows` images of an N-image pool with P patches each, comparing
    `query` patches of one image (default all P) with `chunk` others at a time (besides the pool's features and
    the [N, P] output):

    [rows, P, N] nearest distances, the interval mean's top-k ([rows, P, k] values + int64 indices), the
    [query, chunk * P] distance block and its two minima ([query, chunk] and [chunk, P])."""
    k = interval_count(n - 1, topmin)
    q = p if query is None else query
    return (rows * p * n + rows * p * k * 3 + q * chunk * p + q * chunk + chunk * p) * BYTES


def pair_blocks(n: int, p: int, topmin: float, max_memory_mb: float, chunk_images: int = 8) -> tuple[int, int]:
    """(image rows per block, images per distance block) whose `working_set_bytes` fit `max_memory_mb`.

    Prefers all N rows (every pair computed once) and `chunk_images` images per product; halves the chunk while
    the distance block alone takes more than half the budget, then takes as many rows as fit (at least one)."""
    budget = max_memory_mb * 2**20
    chunk = max(1, min(chunk_images, n - 1))
    while chunk > 1 and working_set_bytes(0, chunk, n, p, topmin) > budget / 2:
        chunk = max(1, chunk // 2)
    q = query_patches(n, p, topmin, max_memory_mb, chunk)
    per_row = working_set_bytes(1, 0, n, p, topmin)
    rows = int((budget - working_set_bytes(0, chunk, n, p, topmin, q)) // per_row)
    return max(1, min(n, rows)), chunk


def query_patches(n: int, p: int, topmin: float, max_memory_mb: float, chunk: int) -> int:
    """How many of an image's P patches one distance block compares (all P unless the [P, chunk * P] block of one
    image pair alone takes more than half the budget: images of many patches, e.g. a tiled image's T tiles; then
    halved until it fits, at least one)."""
    budget = max_memory_mb * 2**20
    q = p
    while q > 1 and working_set_bytes(0, chunk, n, p, topmin, q) > budget / 2:
        q = (q + 1) // 2
    return q


def mutual_scores(grid: torch.Tensor, topmin: float = 0.3, chunk_images: int = 8, max_memory_mb: float = 256.0,
                  rows: int | None = None, query: int | None = None) -> torch.Tensor:
    """MSM over a pool of unlabeled images: grid [N, h, w, D] (N >= 2) -> patch scores [N, h, w].

    The pool is scored in blocks of image rows sized by `pair_blocks` so that the working memory stays under
    `max_memory_mb` whatever N (`rows` overrides the block size). A block holds the [rows, P, N] distances of
    its images' patches to their nearest patch in every image (itself +inf, so never among the smallest).
    Inside a block each pair's distance matrix is computed once and read both ways (rows: i's patches against
    j, columns: j's patches against i); a pair across blocks is computed once per direction, so one block (the
    default up to ~200 images of 28 x 28 patches) costs N(N-1)/2 patch-matrix products and B blocks up to
    N(N-1)(1 - 1/2B). Image i is compared with `chunk_images` images at a time: one `addmm` [P, D] x [D, m*P]
    with the norm trick (|o|^2 as the bias, |q|^2 added in place; squared norms computed once per image), one
    or two `amin`s; clamp and sqrt only on the minima (both monotone). When one image pair's [P, P] block alone
    exceeds half the budget (images of many patches: a tiled image's T tiles are one image of T x P patches),
    i's patches are taken `query_patches` at a time (`query` overrides), the columns' minima kept as a running
    minimum over those slices: the same products, the same scores."""
    n, h, w, d = grid.shape
    if n < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {n}")
    p = h * w
    flat = grid.reshape(n, p, d).float()
    auto_rows, chunk = pair_blocks(n, p, topmin, max_memory_mb, chunk_images)
    q = max(1, min(p, query or query_patches(n, p, topmin, max_memory_mb, chunk)))
    spans = [(a, min(a + q, p)) for a in range(0, p, q)]  # slices of i's patches (one: all P, untiled)
    sq = torch.cat([(f * f).sum(-1) for f in flat.split(chunk)])  # [N, P], no [N, P, D] temporary
    b = max(1, min(n, rows or auto_rows))
    k = interval_count(n - 1, topmin)
    out = torch.empty(n, p)
    nearest_buf = torch.empty(b, p, n)  # [i in block, patch of i, j]: distance to its nearest patch in image j

    def d2_block(i: int, a: int, z: int, s: int, e: int) -> torch.Tensor:  # [z - a of i's P, e - s, P of j]
        m = e - s
        d2 = torch.addmm(sq[s:e].reshape(1, m * p), flat[i, a:z], flat[s:e].reshape(m * p, d).T, alpha=-2.0)
        return d2.add_(sq[i, a:z][:, None]).view(z - a, m, p)

    for r0 in range(0, n, b):
        r1 = min(r0 + b, n)
        nearest = nearest_buf[: r1 - r0]
        for i in range(r0, r1):
            nearest[i - r0, :, i] = float("inf")  # itself
            for s in range(i + 1, r1, chunk):  # later images of the block: both directions from one product
                e = min(s + chunk, r1)
                back = nearest[s - r0 : e - r0, :, i]  # [m, P]: j's patches -> nearest in i
                for a, z in spans:
                    d2 = d2_block(i, a, z, s, e)
                    nearest[i - r0, a:z, s:e] = d2.amin(-1).clamp_min_(0).sqrt_()  # i's patches -> nearest in j
                    col = d2.amin(0).clamp_min_(0).sqrt_()  # [m, P] over this slice of i's patches
                    back.copy_(col if a == 0 else torch.minimum(back, col))
            for lo, hi in ((0, r0), (r1, n)):  # images of other blocks: this direction only
                for s in range(lo, hi, chunk):
                    e = min(s + chunk, hi)
                    for a, z in spans:
                        nearest[i - r0, a:z, s:e] = d2_block(i, a, z, s, e).amin(-1).clamp_min_(0).sqrt_()
        out[r0:r1] = interval_mean(nearest, topmin, k)  # [rows, P]
    return out.reshape(n, h, w)


def rescore(scores: torch.Tensor, global_feats: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """RsCIN (the official `MMO`): scores [N], global features [N, E] -> mean over k in `ks` of the
    similarity-weighted mean score of each image's k most similar images (cosine weights, itself included; k capped
    at N). Empty `ks` returns the scores unchanged. The official code min-max normalises the scores first; a
    weighted mean commutes with that affine map, so the ranking is the same and the scores keep their scale."""
    if not ks:
        return scores
    g = F.normalize(global_feats.float(), dim=-1)
    sim = g @ g.T  # [N, N]; itself first (cos 1)
    n = scores.shape[0]
    out = []
    for k in ks:
        keep = torch.zeros_like(sim).scatter_(1, sim.topk(min(k, n), dim=1).indices, 1.0)
        w = sim * keep
        out.append((w / w.sum(1, keepdim=True)) @ scores.float())
    return torch.stack(out).mean(0)
