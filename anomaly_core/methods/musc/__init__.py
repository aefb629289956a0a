"""MuSc (ICLR 2024): zero-shot, training-free and shot-free mutual scoring. Each val/test image's patches are
scored against the patches of the other unlabeled val/test images of its category (never their labels), for
several neighbourhood sizes (LNAMD), averaged; image scores (map maxima) are re-scored over each image's most
similar images (RsCIN). Transductive: an image's score depends on the other test images (said in `_protocol`).
The mutual-scoring maths is in `mutual.py`; with `tiling.enabled` (branch visual) the pool is scored on the cached
tiles and the maps stitched (`tiled.py`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from anomaly_core.config import positive
from anomaly_core.data.manifest import Row, rows_for
from anomaly_core.errors import ConfigError
from anomaly_core.kit.maps import image_score_from_map, to_image_maps
from anomaly_core.kit.patches import cnn_patches
from anomaly_core.kit.scores import Scores, score_splits
from anomaly_core.kit.tiling import tiling_from
from anomaly_core.methods.base import Context, Method, branch_of
from anomaly_core.methods.musc.mutual import mutual_scores, rescore
from anomaly_core.store import FeatureStore


@dataclass
class MuscConfig:
    branch: Literal["visual", "clip"] = "visual"
    aggregate_sizes: list[int] = field(default_factory=lambda: [1, 3, 5])  # LNAMD neighbourhoods r
    topmin: float = 0.3          # MSM: mean of the smallest 30 % of the per-image nearest distances
    rescore_k: list[int] = field(default_factory=lambda: [2, 3])  # RsCIN neighbourhood sizes ([] = off)
    sigma: float = 4.0           # Gaussian smoothing of the maps (pixels)
    max_memory_mb: float = 256.0  # working memory of the pair loop (blocks of images sized to fit; scores unchanged)

    def validate(self, section: str) -> None:
        positive(section, max_memory_mb=self.max_memory_mb)
        if not self.aggregate_sizes or any(r < 1 or r % 2 == 0 for r in self.aggregate_sizes):
            raise ConfigError(f"{section}.aggregate_sizes={self.aggregate_sizes}: odd sizes >= 1, at least one")
        if not 0.0 < self.topmin <= 1.0:
            raise ConfigError(f"{section}.topmin={self.topmin}: must be in (0, 1]")
        if any(k < 1 for k in self.rescore_k):
            raise ConfigError(f"{section}.rescore_k={self.rescore_k}: sizes >= 1")
        if self.sigma < 0:
            raise ConfigError(f"{section}.sigma={self.sigma}: must be >= 0")


def musc_clip_levels(levels: list[torch.Tensor], grid: int, r: int) -> list[torch.Tensor]:
    """LNAMD of CLIP tokens, as the official `_LNAMD.py`: [N, g*g, E] per level -> per level [N, g, g, E]: layer norm
    over each image's whole [E, g, g] map (no affine), r x r mean with zero padding (the official unfold + mean),
    L2-normalised."""
    out = []
    for lvl in levels:
        x = lvl.float().reshape(lvl.shape[0], grid, grid, -1).permute(0, 3, 1, 2)  # [N, E, g, g]
        x = F.layer_norm(x, x.shape[1:])
        if r > 1:
            x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
        out.append(F.normalize(x.permute(0, 2, 3, 1), dim=-1))
    return out


def clip_grid_tokens(levels: list[torch.Tensor], grid: int, r: int) -> torch.Tensor:
    """CLIP tokens [N, g*g, E] per level -> LNAMD per level, concatenated [N, g, g, levels*E]."""
    return torch.cat(musc_clip_levels(levels, grid, r), dim=-1)


def clip_patch_scores(levels: list[torch.Tensor], grid: int, sizes: list[int], topmin: float,
                      max_memory_mb: float = 256.0) -> torch.Tensor:
    """CLIP tokens [N, g*g, E] per level -> MuSc patch scores [N, g, g]: mutual scores of each level apart,
    averaged over the levels, then over the LNAMD sizes (the official models/musc.py order)."""
    return torch.stack([torch.stack([mutual_scores(lv, topmin, max_memory_mb=max_memory_mb)
                                     for lv in musc_clip_levels(levels, grid, r)]).mean(0)
                        for r in sizes]).mean(0)


def musc_pool(store: FeatureStore, rows: list[Row], cfg: MuscConfig, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One category's unlabeled pool -> (image scores [N], maps [N, size, size])."""
    feats = store.get(cfg.branch, rows)
    levels = store.levels(feats)
    if cfg.branch == "clip":
        g = store.info["clip"]["grid"]
        patch = clip_patch_scores(levels, int(g[0] if isinstance(g, (list, tuple)) else g), cfg.aggregate_sizes,
                                  cfg.topmin, cfg.max_memory_mb)
        glob = feats["global"]
    else:
        grids = [cnn_patches(levels, r) for r in cfg.aggregate_sizes]
        glob = levels[-1].float().mean(dim=(2, 3))  # [N, C] global average of the deepest level
        patch = torch.stack([mutual_scores(g_, cfg.topmin, max_memory_mb=cfg.max_memory_mb)
                             for g_ in grids]).mean(0)  # [N, h, w]
    maps = to_image_maps(patch, size, cfg.sigma)
    return rescore(image_score_from_map(maps, "max"), glob, cfg.rescore_k), maps


def score(ctx: Context, states: dict) -> Scores:
    pooled: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]] = {}
    tiling = tiling_from(ctx.params)  # in score-musc.json only with tiling.enabled and musc.branch: visual

    def scored(pool: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        if tiling is None:
            return musc_pool(ctx.store, pool, ctx.cfg, ctx.size)
        from anomaly_core.methods.musc.tiled import tiled_pool

        return tiled_pool(ctx.store, pool, ctx.cfg, tiling, ctx.size, torch.float16)  # score files hold float16

    def prepare(cat: str) -> None:  # the whole unlabeled pool of the category: its val and test images
        pool = rows_for(ctx.rows, cat, "val") + rows_for(ctx.rows, cat, "test")
        pooled.clear()
        pooled[cat] = ([r.id for r in pool], *scored(pool))

    def part(cat: str, rows: list[Row]):
        ids, image, maps = pooled[cat]
        idx = torch.tensor([ids.index(r.id) for r in rows])
        return image[idx], maps[idx]

    return score_splits(ctx.rows, part, prepare)


METHOD = Method(
    name="musc", section="musc", config=MuscConfig, role="visual", score=score, branches=branch_of("musc.branch"),
    transductive=True, tiles=True, deploy="anomaly_core.methods.musc.deploy",
    summary="MuSc: zero-shot mutual scoring of each val/test image's patches against the other unlabeled val/test "
            "images of its category (LNAMD sizes `aggregate_sizes`, interval mean `topmin`), RsCIN re-scoring "
            "(`rescore_k`); no shots, no training; transductive; tiles with `tiling.enabled` (branch visual)",
)
