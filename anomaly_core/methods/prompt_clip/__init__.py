"""CoOp (method `prompt_clip`): `n_ctx` learnable context vectors through the frozen CLIP text encoder, trained
on cached tokens of the shots and val anomalies with early stopping on held-out val; scored like zero-shot CLIP
with the learned anchors. The maths, training, checkpoints and curves are in `coop.py`."""
from __future__ import annotations

from pathlib import Path

from anomaly_core.kit.scores import Scores
from anomaly_core.methods.base import Context, Method, fixed_branches
from anomaly_core.methods.prompt_clip.coop import (
    CoopConfig,
    coop_histories,
    load_prompt_clip,
    save_prompt_clip,
    score_prompt_clip,
    train_prompt_clip,
)


def fit(ctx: Context):
    return train_prompt_clip(ctx.store, ctx.rows, ctx.clip(), ctx.cfg, ctx.size, ctx.progress)


def save(path: Path, learner, ctx: Context) -> None:
    save_prompt_clip(path, learner, ctx.arch("clip"), ctx.cfg)


def load(path: Path, ctx: Context):
    return load_prompt_clip(path, ctx.arch("clip"))[0]


def score(ctx: Context, states: dict) -> Scores:
    return score_prompt_clip(ctx.store, ctx.rows, states, ctx.cfg, ctx.size, ctx.progress)


METHOD = Method(
    name="prompt_clip", section="prompt_clip", config=CoopConfig, role="clip", score=score, fit=fit, save=save,
    load=load, branches=fixed_branches("clip"), fit_reads=("prompt_clip", "backbones.clip"),
    holdout="prompt_clip.holdout_fraction", seeded=True, curves=coop_histories,
    summary="CoOp: `n_ctx` learnable context vectors (shared, or per state with `class_specific`) through the frozen "
            "text encoder; early stopping on held-out val",
)
