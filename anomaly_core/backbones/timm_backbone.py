"""timm backbones with `features_only` multi-scale maps (EfficientNet-Lite0, ResNet, DINOv2/DINOv3 ViTs)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from anomaly_core.backbones.weights import (
    EFFNET_LITE0_PACKAGE,
    efficientnet_lite0_package_state,
    is_local_file,
    is_random,
    load_state_dict_file,
)
from anomaly_core.errors import ConfigError, WeightsError


def unloaded_error(pretrained: str, model: str, missing: list[str], total: int) -> WeightsError:
    """The refusal of a weights file that leaves backbone tensors unloaded (they would stay random while info.json
    says pretrained), listing the first few and the opt-in."""
    return WeightsError(f"{pretrained} does not fit {model}: {len(missing)} of {total} backbone tensors would stay "
                        f"unloaded ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); give a checkpoint "
                        "of this architecture (or set the backbone's allow_partial_weights: true to keep them random)")


def is_vit_name(name: str) -> bool:
    return "vit" in name or "dino" in name


def fit_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A ViT checkpoint's absolute position embedding [1, prefix + g*g, D] resampled (bicubic, timm's rule) to the
    model's grid when the checkpoint was saved at another image size (DINOv2: 518 px); other tensors unchanged."""
    want = model.state_dict().get("pos_embed")
    have = state.get("pos_embed")
    if want is None or have is None or have.shape == want.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    grid = model.patch_embed.grid_size
    return {**state, "pos_embed": resample_abs_pos_embed(have, new_size=list(grid), num_prefix_tokens=prefix)}


def _build(name: str, pretrained: str | None, allow_partial: bool = False,
           image_size: int | None = None) -> tuple[nn.Module, list[str]]:
    """A full timm model (with head) carrying the requested weights, and the backbone tensors a local weights file
    left unloaded (refused unless `allow_partial`). ViTs are built at `image_size` (their position embedding's grid)."""
    import timm

    kwargs = {"img_size": image_size} if image_size and is_vit_name(name) else {}
    if is_random(pretrained):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same untrained weights in every stage and process
            return timm.create_model(name, pretrained=False, **kwargs), []
    if pretrained == EFFNET_LITE0_PACKAGE:
        if name != "efficientnet_lite0":
            raise ConfigError(f"pretrained={EFFNET_LITE0_PACKAGE} only fits efficientnet_lite0, not {name}")
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(efficientnet_lite0_package_state(model))
        return model, []
    if is_local_file(pretrained):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # tensors a partial file leaves unloaded are the same in every stage and process
            model = timm.create_model(name, pretrained=False, **kwargs)
        state = fit_pos_embed(load_state_dict_file(pretrained), model)
        missing, _ = model.load_state_dict(state, strict=False)
        head = model.pretrained_cfg.get("classifier") or "classifier"  # unused by the features_only backbone
        heads = (head,) if isinstance(head, str) else tuple(head)
        missing = [k for k in missing if not any(k == h or k.startswith(h + ".") for h in heads)]
        if missing and not allow_partial:  # a partly loaded backbone would pass for pretrained with random layers
            raise unloaded_error(pretrained, f"timm model {name}", missing, len(model.state_dict()))
        return model, missing
    try:  # a hub tag such as "timm/vit_small_patch14_dinov2.lvd142m" or "default"
        return timm.create_model(name if pretrained in ("default", "hub") else pretrained, pretrained=True, **kwargs), []
    except Exception as exc:
        raise WeightsError(
            f"cannot load timm weights '{pretrained}' for {name} offline ({type(exc).__name__}); "
            f"set backbones.visual.pretrained=/path/to/weights.safetensors"
        ) from exc


class TimmBackbone(nn.Module):
    """Frozen timm model returning feature maps [B, C_j, h_j, w_j] at `levels` (timm `out_indices`)."""

    kind = "visual"

    def __init__(self, name: str, pretrained: str | None, levels: Sequence[int], image_size: int = 224,
                 allow_partial_weights: bool = False):
        super().__init__()
        import timm

        self.name, self.pretrained = name, "random" if is_random(pretrained) else str(pretrained)
        self.untrained = is_random(pretrained)
        self.levels = [int(v) for v in levels]
        self.image_size = int(image_size)
        self.is_vit = is_vit_name(name)
        full, self.missing_tensors = _build(name, pretrained, allow_partial_weights, self.image_size)
        cfg = full.pretrained_cfg or {}
        self.mean, self.std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        kwargs = {"img_size": self.image_size} if self.is_vit else {}
        try:
            self.model = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(self.levels), **kwargs)
        except (IndexError, ValueError, AssertionError) as exc:
            raise ConfigError(f"backbones.visual.levels={self.levels} do not exist for {name}: {exc}") from exc
        state = full.state_dict()
        if all(k.startswith("model.") for k in self.model.state_dict()):  # ViTs: timm's FeatureGetterNet wraps the model
            state = {f"model.{k}": v for k, v in state.items()}
        missing, _ = self.model.load_state_dict(state, strict=False)
        if missing:
            raise WeightsError(f"{name}: features_only model lacks {len(missing)} weights, e.g. {missing[0]}")
        self.model.eval().requires_grad_(False)
        if not self.is_vit:  # CNNs: NHWC convolutions are ~1.5x faster on CPU (oneDNN), same values to ~1e-5
            self.model.to(memory_format=torch.channels_last)
        self.channels = list(self.model.feature_info.channels())
        self.reductions = list(self.model.feature_info.reduction())

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """images [B,3,S,S] normalised -> {"levels": [B, C_j, S/r_j, S/r_j] per level}."""
        if not self.is_vit:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.model(images)
        feats = [f if f.ndim == 4 else f.permute(0, 3, 1, 2) for f in feats]  # NHWC -> NCHW for some ViTs
        feats = [f.contiguous() for f in feats]  # plain NCHW layout for the caches and the kNN
        return {"levels": list(feats)}
