"""One registry for every backbone: `create_backbone(name, pretrained, levels, image_size)`.

Names known to open_clip (including the shipped `anomaly-core-tiny-clip`) build a `ClipBackbone`;
anything else is a timm model name and builds a `TimmBackbone`. `open_clip:` / `timm:` prefixes force
the family.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from anomaly_core.backbones.names import TINY_CLIP, open_clip_vision, resolve_name
from anomaly_core.backbones.weights import check_weights
from anomaly_core.errors import ConfigError

if TYPE_CHECKING:  # torch, timm and open_clip load when a backbone is built, not to check params (`validate`)
    import torch

    from anomaly_core.backbones.clip import ClipBackbone
    from anomaly_core.backbones.timm_backbone import TimmBackbone

__all__ = ["create_backbone", "backbone_from_config", "check_backbone", "resolve_name", "ClipBackbone", "TimmBackbone", "TINY_CLIP", "preprocess"]


def __getattr__(name: str):
    """The backbone classes, imported (with torch) on first use."""
    if name == "ClipBackbone":
        from anomaly_core.backbones.clip import ClipBackbone

        return ClipBackbone
    if name == "TimmBackbone":
        from anomaly_core.backbones.timm_backbone import TimmBackbone

        return TimmBackbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_backbone(name: str, pretrained: str | None, levels: Sequence[int], image_size: int | None = None,
                    allow_partial_weights: bool = False):
    """Build a frozen backbone in eval mode. See the module docstring for how `name` is resolved.

    A local weights file that leaves backbone tensors unloaded is a WeightsError unless `allow_partial_weights`;
    the backbone's `missing_tensors` lists them (they keep a seeded random initialisation)."""
    from anomaly_core.backbones.clip import ClipBackbone
    from anomaly_core.backbones.timm_backbone import TimmBackbone

    family, model = resolve_name(name)
    if family == "open_clip":
        return ClipBackbone(model, pretrained, levels, image_size, allow_partial_weights)
    return TimmBackbone(model, pretrained, levels, image_size or 224, allow_partial_weights)


def check_backbone(key: str, name: str, pretrained: str | None, levels: Sequence[int], image_size: int) -> None:
    """Everything about a backbone that can be checked without building it (`key` = `backbones.clip`).

    The name exists (open_clip config or timm model), the weights spec resolves offline (file / package / cache),
    and for open_clip ViTs the levels and image size fit the config's depth and input size.
    Raises ConfigError / WeightsError in one line naming the dotted key and what to set.
    """
    family, model = resolve_name(name, f"{key}.name")
    if family == "open_clip":
        vision = open_clip_vision(model)
        depth, native = vision.get("layers"), vision.get("image_size")
        if isinstance(depth, int):
            bad = [v for v in levels if not 1 <= int(v) <= depth]
            if bad:
                raise ConfigError(f"{key}.levels={list(levels)}: {model} has {depth} vision layers (use 1..{depth})")
        if isinstance(native, int) and image_size != native:
            raise ConfigError(f"{key}.image_size={image_size}: {model} takes {native} px inputs (set it to {native})")
    check_weights(family, model, pretrained, f"{key}.pretrained")


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, size, size] (kornia resize, bilinear with antialias)."""
    import kornia
    import torch

    x = images.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = kornia.geometry.transform.resize(x, (size, size), interpolation="bilinear", antialias=True)
    return kornia.enhance.normalize(x, torch.tensor(mean), torch.tensor(std))


def backbone_from_config(raw: dict, key: str, device: torch.device | None = None):
    """(BackboneConfig, frozen backbone on `device`) from a params section such as `backbones.clip` (`key`)."""
    import torch

    from anomaly_core.config import BackboneConfig, build

    cfg = build(BackboneConfig, raw, key)
    backbone = create_backbone(cfg.name, cfg.pretrained, cfg.levels, cfg.image_size, cfg.allow_partial_weights)
    return cfg, backbone.to(device or torch.device("cpu"))
