"""Zero-shot CLIP: the prompt ensemble (normal / abnormal states x templates) averaged to one anchor pair per
category; patch-to-text similarity at every cached level. `fit` encodes the anchors once (the text tower is
frozen), so scoring needs only the cached image tokens."""
from __future__ import annotations

from pathlib import Path

import torch

from anomaly_core.config import ZeroShotConfig
from anomaly_core.data.manifest import categories
from anomaly_core.io import load_checkpoint, save_checkpoint
from anomaly_core.methods.base import Context, Method, fixed_branches
from anomaly_core.methods.shared import Scores, clip_anchor_scores
from anomaly_core.prompts import build_prompts

KIND = "zero_shot_clip"


@torch.no_grad()
def fit(ctx: Context):
    clip = ctx.clip()
    return {cat: clip.text_anchors(build_prompts(cat)).cpu() for cat in categories(ctx.rows)}, {}


def save(path: Path, anchors, ctx: Context) -> None:
    save_checkpoint(path, KIND, ctx.arch("clip"), {"anchors": anchors})  # [2, E]


def load(path: Path, ctx: Context):
    return load_checkpoint(path, KIND, ctx.arch("clip"))["state_dict"]["anchors"]


def score(ctx: Context, states: dict) -> Scores:
    cfg = ctx.cfg
    return clip_anchor_scores(ctx.store, ctx.rows, states, cfg.sigma, cfg.image_weight, cfg.temperature, ctx.size)


METHOD = Method(
    name="zero_shot_clip", section="zero_shot", config=ZeroShotConfig, role="clip", score=score, fit=fit, save=save,
    load=load, branches=fixed_branches("clip"), fit_reads=("backbones.clip",),
    summary="prompt ensemble (6 normal x 10 abnormal states x 7 templates) averaged to one normal and one abnormal "
            "anchor per class; patch-to-text similarity at every level; image score mixes the global embedding "
            "with the map max",
)
