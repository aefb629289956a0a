"""Patch kNN (PatchCore / AnomalyDINO style): the k shots' patch descriptors are the memory bank of each category;
a patch's score is its distance to the nearest bank patches. Training-free; the maths is in `scoring/knn.py`."""
from __future__ import annotations

from anomaly_core.config import KnnConfig
from anomaly_core.methods.base import Context, Method, branch_of
from anomaly_core.methods.shared import Scores, knn_scores

def score(ctx: Context, states: dict) -> Scores:
    return knn_scores(ctx.store, ctx.rows, ctx.cfg, ctx.size, ctx.seed, ctx.progress)


METHOD = Method(
    name="knn", section="knn", config=KnnConfig, role="visual", score=score, branches=branch_of("knn.branch"),
    shot_features=True,
    summary="memory bank of the k shots' patch descriptors (CNN levels or CLIP tokens), distance to the nearest "
            "bank patches; optional greedy coreset",
)
