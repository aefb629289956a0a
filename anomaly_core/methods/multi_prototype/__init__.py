"""Multi-prototype CLIP anchors (seeds/002): K normal and M abnormal learnable prototypes per category,
initialised from the prompt ensemble, trained on cached tokens of the shots and val anomalies. The maths,
training and diagnostics are in `model.py`."""
from __future__ import annotations

from pathlib import Path

from anomaly_core.kit.scores import Scores
from anomaly_core.methods.base import Context, Method, fixed_branches
from anomaly_core.methods.multi_prototype.model import (
    MultiProtoConfig,
    load_multi_prototype,
    save_multi_prototype,
    score_multi_prototype,
    train_multi_prototype,
)


def fit(ctx: Context):
    return train_multi_prototype(ctx.store, ctx.rows, ctx.clip(), ctx.cfg, ctx.size, ctx.progress)


def save(path: Path, model, ctx: Context) -> None:
    save_multi_prototype(path, model, ctx.arch("clip"), ctx.cfg)


def load(path: Path, ctx: Context):
    return load_multi_prototype(path, ctx.arch("clip"))[0]


def score(ctx: Context, states: dict) -> Scores:
    return score_multi_prototype(ctx.store, ctx.rows, states, ctx.cfg, ctx.size, ctx.progress)


def curves(report: dict):
    return ({cat: [{"epoch": e + 1, "loss": v} for e, v in enumerate(r["history"]["loss"])] for cat, r in report.items()},
            {f"{cat}/healthy": float(r["diagnostics"]["healthy"]) for cat, r in report.items()})


METHOD = Method(
    name="multi_prototype", section="multi_prototype", config=MultiProtoConfig, role="clip", score=score, fit=fit,
    save=save, load=load, branches=fixed_branches("clip"), fit_reads=("multi_prototype", "backbones.clip"),
    holdout="multi_prototype.holdout_fraction", seeded=True, curves=curves,
    summary="`n_pro` normal and `n_pro_ab` abnormal learnable prototypes initialised from the prompt ensemble "
            "(k-means); diagnostics (usage, collapse, separation) against the seed's healthy ranges",
)
