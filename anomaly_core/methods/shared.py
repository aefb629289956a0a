"""What several methods share: the per-category / per-split scoring loop, the image score that mixes a global
probability with the map maximum, patch grids of the cached features, the patch-kNN scoring loop (plain kNN,
and VPT as a transform of it), the anchor-pair CLIP scoring (zero-shot and CoOp), and the CLIP training data
(k-shot normal tokens + val-anomaly tokens) that multi-prototype and CoOp train on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from anomaly_core.data.holdout import shot_rows
from anomaly_core.data.manifest import Row, categories, rows_for, stable_rng
from anomaly_core.evaluation import masks_for
from anomaly_core.config import KnnConfig
from anomaly_core.scoring.knn import PatchKnn, clip_patches, cnn_patches
from anomaly_core.scoring.maps import mix_image_score
from anomaly_core.scoring.zero_shot import zero_shot_scores
from anomaly_core.store import FeatureStore

Scores = dict[str, dict[str, tuple[list[str], torch.Tensor, torch.Tensor]]]  # {split: {category: (ids, image [N], maps [N, S, S])}}
EVAL_SPLITS = ("val", "test")

__all__ = ["Scores", "EVAL_SPLITS", "score_splits", "mix_image_score", "patch_grid", "knn_scores", "clip_anchor_scores",
           "category_seed", "ClipTrainData", "clip_grid", "grid_coverage", "clip_train_data", "resample", "shot_rows"]


def score_splits(rows: Sequence[Row], score_part: Callable[[str, list[Row]], tuple[torch.Tensor, torch.Tensor]],
                 prepare: Callable[[str], object] | None = None) -> Scores:
    """The loop every method runs: for each category (after `prepare(category)`, e.g. building a memory bank)
    and each evaluation split with rows, `score_part(category, rows) -> (image [N], maps [N, S, S])`."""
    out: Scores = {s: {} for s in EVAL_SPLITS}
    for cat in categories(rows):
        if prepare is not None:
            prepare(cat)
        for split in EVAL_SPLITS:
            part = rows_for(rows, cat, split)
            if part:
                image, maps = score_part(cat, part)
                out[split][cat] = ([r.id for r in part], image, maps)
    return out


def patch_grid(store: FeatureStore, branch: str, rows: Sequence[Row], aggregate: int,
               pad: str = "zeros") -> torch.Tensor:
    """Cached features of `rows` -> patch descriptors [N, h, w, D] (CNN maps locally aggregated with border `pad`,
    or per-level normalised CLIP tokens)."""
    feats = store.get(branch, rows)
    levels = store.levels(feats)
    if branch == "clip":
        return clip_patches(levels, store.info["clip"]["grid"])
    return cnn_patches(levels, aggregate, pad)


Transform = Callable[[str, torch.Tensor], torch.Tensor]  # (category, grid [N, h, w, D]) -> [N, h, w, D']


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


def clip_anchor_scores(store: FeatureStore, rows: Sequence[Row], anchors: dict[str, torch.Tensor], sigma: float,
                       image_weight: float, temperature: float, size: int) -> Scores:
    """Scores from cached CLIP tokens against one (normal, abnormal) anchor pair per category [2, E]: the
    zero-shot CLIP rule, shared by zero-shot prompts and CoOp's learned prompts."""
    grid = store.info["clip"]["grid"]

    def part(cat: str, rows_: list[Row]):
        feats = store.get("clip", rows_)
        return zero_shot_scores(store.levels(feats), feats["global"], anchors[cat], grid, size, sigma,
                                image_weight, temperature)

    return score_splits(rows, part)


def category_seed(seed: int, method: str, category: str) -> int:
    """A per-(method, category) torch seed that does not depend on which other categories exist."""
    return int(stable_rng(seed, f"{method}/{category}").integers(2**31 - 1))


# ---------------------------------------------------------------------------- CLIP training data


@dataclass
class ClipTrainData:
    """Cached CLIP tokens of one category, flattened over images and levels."""

    normal_patches: torch.Tensor    # [Pn, E] shots first (their count is n_shot_patches), then clean cells
    abnormal_patches: torch.Tensor  # [Pa, E] grid cells of anomalous images with mask coverage >= min_coverage
    normal_globals: torch.Tensor    # [Gn, E]
    abnormal_globals: torch.Tensor  # [Ga, E]
    n_shot_patches: int = 0

    def counts(self) -> dict[str, int]:
        return {"normal_patches": int(self.normal_patches.shape[0]),
                "abnormal_patches": int(self.abnormal_patches.shape[0]),
                "normal_images": int(self.normal_globals.shape[0]),
                "abnormal_images": int(self.abnormal_globals.shape[0])}


def clip_grid(store: FeatureStore) -> int:
    """The CLIP patch grid side from the feature store's info (an int, or [gh, gw] with gh == gw)."""
    grid = store.info["clip"]["grid"]
    return int(grid[0] if isinstance(grid, (list, tuple)) else grid)


def grid_coverage(rows: Sequence[Row], size: int, grid: int) -> torch.Tensor:
    """Share of each grid cell covered by the ground-truth mask: rows -> [N, grid*grid] in [0, 1]
    (row-major, the order of the CLIP patch tokens). Masks are read at `size` then area-averaged."""
    masks = torch.from_numpy(masks_for(rows, size)).float()[:, None]  # [N, 1, S, S]
    return F.adaptive_avg_pool2d(masks, grid).flatten(1)  # [N, g*g]


def clip_train_data(store: FeatureStore, normal_rows: Sequence[Row], anomalous_rows: Sequence[Row], size: int,
                    min_coverage: float = 0.5) -> ClipTrainData:
    """Gather cached CLIP tokens: every patch of every level of `normal_rows` is normal; for
    `anomalous_rows`, cells with coverage >= min_coverage are abnormal, cells with zero coverage normal."""
    feats = store.get("clip", normal_rows)
    levels = store.levels(feats)  # [N, L, E] each
    dim = feats["global"].shape[-1]
    normal = [lvl.reshape(-1, dim) for lvl in levels]
    n_shot = sum(p.shape[0] for p in normal)
    abnormal, ab_glob = [torch.zeros(0, dim)], torch.zeros(0, dim)
    if anomalous_rows:
        afeats = store.get("clip", anomalous_rows)
        cov = grid_coverage(anomalous_rows, size, clip_grid(store))  # [Na, L]
        for lvl in store.levels(afeats):
            abnormal.append(lvl[cov >= min_coverage])
            normal.append(lvl[cov == 0])
        ab_glob = afeats["global"]
    return ClipTrainData(torch.cat(normal), torch.cat(abnormal), feats["global"], ab_glob, n_shot)


def resample(x: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n rows of x [P, E] drawn with replacement (all of x when P <= n); [0, E] stays empty."""
    if x.shape[0] <= n:
        return x
    return x[torch.randint(x.shape[0], (n,), generator=g)]
