"""Visual prompt tuning on the kNN branch (seeds/000, 001): learned prompt tokens modulate the patch descriptors
of `knn.branch`, then the plain patch kNN (`kit.knn.knn_scores`, as method `knn`) runs on the modulated
descriptors: VPT is a transform of the kNN branch. The prompt maths, training and checkpoints are in `vpt.py`; with
`tiling.enabled` the prompts are trained on the shots' tiles and the tiled kNN scores the modulated tiles (`tiled.py`)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from anomaly_core.config import build
from anomaly_core.kit.knn import KnnConfig, knn_scores
from anomaly_core.kit.scores import Scores
from anomaly_core.kit.tiling import tiling_from
from anomaly_core.methods.base import Context, Method, branch_of
from anomaly_core.methods.vpt_knn.vpt import VptConfig, history_records, load_vpt, save_vpt, train_vpt


def fit(ctx: Context):
    tiling = tiling_from(ctx.params)  # in fit-vpt_knn.json only with tiling.enabled: true
    if tiling is not None:
        from anomaly_core.methods.vpt_knn.tiled import train_vpt_tiled

        kcfg = KnnConfig(branch=ctx.get("knn.branch"), patch_aggregate=ctx.get("knn.patch_aggregate"),
                         patch_pad=ctx.get("knn.patch_pad"))
        return train_vpt_tiled(ctx.store, ctx.rows, ctx.cfg, kcfg, tiling, ctx.progress)
    return train_vpt(ctx.store, ctx.rows, ctx.cfg, ctx.get("knn.branch"), ctx.get("knn.patch_aggregate"),
                     ctx.get("knn.patch_pad"), ctx.progress)


def save(path: Path, model, ctx: Context) -> None:
    save_vpt(path, model, ctx.arch(ctx.get("knn.branch")), ctx.cfg)


def load(path: Path, ctx: Context):
    return load_vpt(path, ctx.arch(ctx.get("knn.branch")))[0]


def score(ctx: Context, states: dict) -> Scores:
    kcfg = replace(build(KnnConfig, ctx.get("knn"), "knn"), k=ctx.cfg.k_neighbors)
    tiling = tiling_from(ctx.params)  # in score-vpt_knn.json (and a bundle's score params) only when enabled
    if tiling is not None:
        from anomaly_core.methods.vpt_knn.tiled import score_vpt_tiled

        return score_vpt_tiled(ctx.store, ctx.rows, kcfg, tiling, ctx.size, ctx.seed, states)
    return knn_scores(ctx.store, ctx.rows, kcfg, ctx.size, ctx.seed, ctx.progress,
                      transform=lambda cat, grid: states[cat].transform(grid))


def curves(report: dict):
    return ({cat: history_records(h) for cat, h in report.items()},
            {f"{cat}/best_epoch": h["best_epoch"] for cat, h in report.items() if "best_epoch" in h})


METHOD = Method(
    name="vpt_knn", section="vpt_knn", config=VptConfig, role="visual", score=score, fit=fit, save=save, load=load,
    branches=branch_of("knn.branch"), shot_features=True, fit_reads=("vpt_knn", "knn.branch", "knn.patch_aggregate", "knn.patch_pad"),
    score_reads=("knn",), holdout="vpt_knn.holdout_fraction", seeded=True, curves=curves, baseline="knn", tiles=True,
    summary="learnable prompt tokens modulate the kNN branch's patch descriptors (prompt-patch attention), trained "
            "for normal/defect separability on val defects; then patch kNN",
)
