"""CLIP image prototypes (seeds/004): the centroid of the k shots' CLIP embeddings, per level for patches and
for the global embedding; score = 1 - cos. The maths and checkpoints are in `prototypes.py` (the centroids
themselves in `kit/prototypes.py`, shared with the classification task)."""
from __future__ import annotations

from pathlib import Path

from anomaly_core.kit.scores import Scores
from anomaly_core.methods.base import Context, Method, fixed_branches
from anomaly_core.methods.image_prototype.prototypes import (
    ImageProtoConfig,
    fit_image_prototypes,
    load_image_prototypes,
    save_image_prototypes,
    score_image_prototypes,
)


def fit(ctx: Context):
    return fit_image_prototypes(ctx.store, ctx.rows), {}


def save(path: Path, protos, ctx: Context) -> None:
    save_image_prototypes(path, protos, ctx.arch("clip"))


def load(path: Path, ctx: Context):
    return load_image_prototypes(path, ctx.arch("clip"))[0]


def score(ctx: Context, states: dict) -> Scores:
    return score_image_prototypes(ctx.store, ctx.rows, states, ctx.cfg, ctx.size, ctx.progress)


METHOD = Method(
    name="image_prototype", section="image_prototype", config=ImageProtoConfig, role="clip", score=score, fit=fit,
    save=save, load=load, branches=fixed_branches("clip"),
    summary="centroid of the shots' CLIP image embeddings (global and per level); score 1 - cos; also a "
            "classification branch",
)
