"""Zero-shot CLIP: the prompt ensemble (normal / abnormal states x templates) averaged to one anchor pair per
category; patch-to-text similarity at every cached level. `fit` encodes the anchors once (the text tower is
frozen), so scoring needs only the cached image tokens."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from anomaly_core.config import Checks
from anomaly_core.data.manifest import categories
from anomaly_core.io import load_checkpoint, save_checkpoint
from anomaly_core.kit.anchors import clip_anchor_scores
from anomaly_core.kit.prompts import build_prompts
from anomaly_core.kit.scores import Scores
from anomaly_core.methods.base import Context, Method, fixed_branches

KIND = "zero_shot_clip"


@dataclass
class ZeroShotConfig:
    sigma: float = 4.0
    image_weight: float = 0.5
    temperature: float = 0.01

    def validate(self, section: str) -> None:
        Checks(section).non_negative(sigma=self.sigma).unit(image_weight=self.image_weight) \
            .positive(temperature=self.temperature).done()


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
    name="zero_shot_clip", section="zero_shot_clip", config=ZeroShotConfig, renamed=("zero_shot",), role="clip", score=score, fit=fit, save=save,
    load=load, branches=fixed_branches("clip"), fit_reads=("backbones.clip",),
    summary="prompt ensemble (6 normal x 10 abnormal states x 7 templates) averaged to one normal and one abnormal "
            "anchor per class; patch-to-text similarity at every level; image score mixes the global embedding "
            "with the map max",
)
