"""One registry for every backbone: `create_backbone(name, pretrained, levels, image_size)`.

Names known to open_clip (including the shipped `anomaly-core-tiny-clip`) build a `ClipBackbone`;
anything else is a timm model name and builds a `TimmBackbone`. `open_clip:` / `timm:` prefixes force
the family.
"""
from __future__ import annotations

from typing import Sequence

import torch

from anomaly_core.backbones.clip import TINY_CLIP, ClipBackbone, is_open_clip_name
from anomaly_core.backbones.timm_backbone import TimmBackbone
from anomaly_core.errors import ConfigError

__all__ = ["create_backbone", "ClipBackbone", "TimmBackbone", "TINY_CLIP", "preprocess"]


def create_backbone(name: str, pretrained: str | None, levels: Sequence[int], image_size: int | None = None):
    """Build a frozen backbone in eval mode. See the module docstring for how `name` is resolved."""
    if name.startswith("open_clip:"):
        return ClipBackbone(name.split(":", 1)[1], pretrained, levels, image_size)
    if name.startswith("timm:"):
        return TimmBackbone(name.split(":", 1)[1], pretrained, levels, image_size or 224)
    if is_open_clip_name(name):
        return ClipBackbone(name, pretrained, levels, image_size)
    import timm

    if not timm.list_models(name):
        raise ConfigError(f"unknown backbone '{name}': not an open_clip model nor a timm model name")
    return TimmBackbone(name, pretrained, levels, image_size or 224)


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, size, size] (kornia resize, bilinear with antialias)."""
    import kornia

    x = images.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = kornia.geometry.transform.resize(x, (size, size), interpolation="bilinear", antialias=True)
    return kornia.enhance.normalize(x, torch.tensor(mean), torch.tensor(std))
