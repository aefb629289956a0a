"""AA-CLIP (seeds/003): residual adapters in the CLIP text tower (stage 1, DVC stage `train_text_adapter`) then
in the vision tower (stage 2, `train_image_adapter`); scoring runs the adapted vision tower on the images
against the stage-1 anchors.

Files: `modules.py` (the adapters), `core.py` (configs, anchors, maps, losses, scoring), `training.py` (stages 1 and
2), `checkpoints.py`, `data.py` (training sets, the `aaclip` section), `stages.py` (the two DVC stages' work),
`api.py` (everything in one import)."""
from __future__ import annotations

from anomaly_core.kit.scores import Scores, score_splits
from anomaly_core.methods.aaclip.checkpoints import load_image_adapters, load_text_adapters
from anomaly_core.methods.aaclip.core import ImageAdapterConfig, TextAdapterConfig, score_images
from anomaly_core.methods.aaclip.data import AaclipConfig, load_images
from anomaly_core.methods.base import Context, Method, fixed_branches

TEXT, IMAGE = "text.pt", "image.pt"  # the two training stages' outputs in data/models/aaclip/


def score(ctx: Context, states: dict) -> Scores:
    clip, arch = ctx.clip(), ctx.get("backbones.clip.name")
    _, anchors = load_text_adapters(ctx.models / TEXT, clip, arch)
    adapters = load_image_adapters(ctx.models / IMAGE, clip, arch)
    scoring = ctx.get("aaclip.scoring")  # official: min-max over each (category, split) part, as test.py per class
    return score_splits(ctx.rows, lambda cat, part: score_images(
        clip, adapters, anchors, load_images(part, clip.image_size), [cat] * len(part), ctx.cfg, out_size=ctx.size,
        scoring=scoring))


def unexportable(score_params: dict) -> str:
    """Official scoring min-max normalises over the scored set: a bundle would score one image unlike the stage."""
    if score_params.get("aaclip", {}).get("scoring") == "official":
        return ("aaclip.scoring=official min-max normalises the scores over each scored set (test.py), so an image's "
                "score depends on the images scored with it and a val threshold does not carry over; set "
                "aaclip.scoring=softmax or export another method (export.method)")
    return ""


METHOD = Method(
    name="aaclip", section="aaclip_image", config=ImageAdapterConfig, role="clip", score=score,
    branches=fixed_branches("clip"), score_reads=("backbones.clip", "aaclip.scoring"),
    trained_by=("train_text_adapter", "train_image_adapter"), stages="anomaly_core.methods.aaclip.stages",
    holdout="aaclip.holdout_fraction", seeded=True, unexportable=unexportable,
    sections={"aaclip": (AaclipConfig, False), "aaclip_text": (TextAdapterConfig, True)},
    summary="AA-CLIP: residual adapters after the first `adapt_until` text then vision layers; stage 1 on cached "
            "tokens (focal + dice over all levels + anchor orthogonality), stage 2 on images with the stage-1 "
            "anchors frozen; checkpoint chosen on held-out val",
)
