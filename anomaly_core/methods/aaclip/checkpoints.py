"""AA-CLIP adapter checkpoints (kinds "aaclip_text" / "aaclip_image") on top of anomaly_core.io.

`anomaly_core.io.load_checkpoint` refuses another schema, kind or architecture; here the stored adapter
configuration is rebuilt against the backbone and every tensor shape is checked, so a checkpoint made for
another backbone width / number of levels fails with a WeightsError that says which tensor differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from anomaly_core.errors import ConfigError, WeightsError
from anomaly_core.io import load_checkpoint, save_checkpoint
from anomaly_core.methods.aaclip.modules import ImageAdapters, TextAdapters

__all__ = ["save_text_adapters", "load_text_adapters", "save_image_adapters", "load_image_adapters"]

TEXT_KIND, IMAGE_KIND = "aaclip_text", "aaclip_image"


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _load_state(path: str | Path, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `module`, raising WeightsError on missing / unexpected keys or shape mismatches."""
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise WeightsError(f"{path}: adapter tensors do not match this backbone (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); re-train the adapters")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise WeightsError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}, this backbone needs "
                               f"{tuple(v.shape)}; the checkpoint was made for another backbone, re-train it")
    module.load_state_dict(state)


def save_text_adapters(path: str | Path, adapters: TextAdapters, anchors: torch.Tensor, class_names: Sequence[str],
                       arch_name: str) -> None:
    """Save text adapters and their anchors [C, 2, E] for `class_names` (C names, same order)."""
    if len(class_names) != anchors.shape[0]:
        raise ValueError(f"{anchors.shape[0]} anchor pairs for {len(class_names)} class names")
    save_checkpoint(path, TEXT_KIND, arch_name, _cpu_state(adapters), anchors=anchors.detach().cpu().float(),
                    class_names=list(class_names),
                    config={"until": adapters.until, "weight": adapters.weight, "style": adapters.style,
                            "text_width": adapters.text_width, "embed_dim": adapters.embed_dim})


def load_text_adapters(path: str | Path, backbone, arch_name: str) -> tuple[TextAdapters, dict[str, torch.Tensor]]:
    """-> (text adapters in eval mode on the backbone's device, {class name: anchors [2, E]} on CPU)."""
    obj = load_checkpoint(path, TEXT_KIND, arch_name)
    cfg = obj.get("config", {})
    try:
        adapters = TextAdapters.for_backbone(backbone, int(cfg.get("until", -1)), float(cfg.get("weight", 0.1)),
                                             str(cfg.get("style", "project")))
    except ConfigError as exc:
        raise WeightsError(f"{path}: does not fit backbone {backbone.name}: {exc}") from exc
    _load_state(path, adapters, obj["state_dict"])
    anchors = obj["anchors"]
    if anchors.dim() != 3 or anchors.shape[1:] != (2, backbone.embed_dim) or len(obj["class_names"]) != len(anchors):
        raise WeightsError(f"{path}: anchors of shape {tuple(anchors.shape)} for {len(obj['class_names'])} classes, "
                           f"expected [C, 2, {backbone.embed_dim}]; re-train the text adapters")
    return adapters.eval(), dict(zip(obj["class_names"], anchors))


def save_image_adapters(path: str | Path, adapters: ImageAdapters, arch_name: str, **extra) -> None:
    """Save image adapters (plus JSON-like `extra`, e.g. the selected epoch)."""
    save_checkpoint(path, IMAGE_KIND, arch_name, _cpu_state(adapters),
                    config={"until": adapters.until, "weight": adapters.weight, "style": adapters.style,
                            "width": adapters.width,
                            "embed_dim": adapters.embed_dim, "n_levels": adapters.n_levels}, **extra)


def load_image_adapters(path: str | Path, backbone, arch_name: str) -> ImageAdapters:
    """-> image adapters in eval mode on the backbone's device (WeightsError if they do not fit it)."""
    obj = load_checkpoint(path, IMAGE_KIND, arch_name)
    cfg = obj.get("config", {})
    if int(cfg.get("n_levels", -1)) != len(backbone.levels):
        raise WeightsError(f"{path}: trained with {cfg.get('n_levels')} feature levels, backbone {backbone.name} "
                           f"is configured with {len(backbone.levels)} ({backbone.levels}); re-train it")
    try:
        adapters = ImageAdapters.for_backbone(backbone, int(cfg.get("until", -1)), float(cfg.get("weight", 0.1)),
                                              str(cfg.get("style", "project")))
    except ConfigError as exc:
        raise WeightsError(f"{path}: does not fit backbone {backbone.name}: {exc}") from exc
    _load_state(path, adapters, obj["state_dict"])
    return adapters.eval()
