"""Patch kNN (PatchCore / AnomalyDINO style): the k shots' patch descriptors are the memory bank of each category;
a patch's score is its distance to the nearest bank patches. Training-free.

The search, coreset and scoring (`KnnConfig`, `PatchKnn`, `knn_scores`, `score_patches`) are in the kit
(`kit/knn.py`): VPT-kNN scores with the same code. This folder holds the method's registration and its deploy
pieces (`deploy.py`: bundle writer, PyTorch engine, ONNX graph).
"""
from __future__ import annotations

from anomaly_core.kit.knn import KnnConfig, knn_scores
from anomaly_core.kit.scores import Scores
from anomaly_core.kit.tiling import tiling_from
from anomaly_core.methods.base import Context, Method, branch_of


def score(ctx: Context, states: dict) -> Scores:
    tiling = tiling_from(ctx.params)  # present in score-knn.json only with tiling.enabled: true
    if tiling is not None:
        from anomaly_core.kit.tiled_knn import store_scores

        return store_scores(ctx.store, ctx.rows, ctx.cfg, tiling, ctx.size, ctx.seed)
    return knn_scores(ctx.store, ctx.rows, ctx.cfg, ctx.size, ctx.seed, ctx.progress)


METHOD = Method(
    name="knn", section="knn", config=KnnConfig, role="visual", score=score, branches=branch_of("knn.branch"),
    shot_features=True, deploy="anomaly_core.methods.knn.deploy", tiles=True,
    summary="memory bank of the k shots' patch descriptors (CNN levels or CLIP tokens), distance to the nearest "
            "bank patches; optional greedy coreset",
)
