"""AA-CLIP's trainable modules: bottleneck adapters, projections, and the text / image adapter sets.

The CLIP backbone stays frozen; adapters act between transformer layers through the backbone's
`hook(layer_index, x)` and (text) replace the final projection through `final(eos)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_core.errors import ConfigError

__all__ = ["SimpleAdapter", "SimpleProj", "TextAdapters", "ImageAdapters", "mix_adapted", "ADAPTER_STYLES"]

ADAPTER_STYLES = ("project", "official")
"""`project` (default): bottleneck MLP adapters with biases, LeakyReLU(0.2), text projection copied from CLIP,
re-normalised det token. `official`: the modules of Mwxinnn/AA-CLIP (model/adapter_modules.py, adapter.py as
train.py builds them): one bias-free Linear + LeakyReLU(0.01) per layer adapter, a random bias-free Linear +
LeakyReLU(0.01) text projection, bias-free Linear seg / det projections without activation (train.py's default
`--relu` off), xavier-uniform init, det token = mean of normalised tokens (not re-normalised); the stage-2
cross-entropy then takes raw cosines (no logit scale), as train.py does."""


def _check_style(style: str) -> str:
    if style not in ADAPTER_STYLES:
        raise ConfigError(f"aaclip adapter={style!r}: use one of {list(ADAPTER_STYLES)}")
    return style


class SimpleAdapter(nn.Module):
    """[..., dim] -> [..., dim]. `project`: bottleneck MLP fc1 (dim -> bottleneck) -> LeakyReLU(0.2) -> fc2
    (bottleneck -> dim). `official`: fc (dim -> dim, no bias) -> LeakyReLU(0.01)."""

    def __init__(self, dim: int, bottleneck: int | None = None, style: str = "project"):
        super().__init__()
        self.style = _check_style(style)
        if style == "official":
            self.fc, self.act = nn.Linear(dim, dim, bias=False), nn.LeakyReLU(0.01)
        else:
            hidden = bottleneck or max(1, dim // 2)
            self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "official":
            return self.act(self.fc(x))
        return self.fc2(self.act(self.fc1(x)))


class SimpleProj(nn.Module):
    """Linear projection [..., in] -> [..., out], followed by LeakyReLU when `relu` (`project`: with bias,
    slope 0.2; `official`: no bias, slope 0.01)."""

    def __init__(self, in_dim: int, out_dim: int, relu: bool = True, style: str = "project"):
        super().__init__()
        official = _check_style(style) == "official"
        self.fc = nn.Linear(in_dim, out_dim, bias=not official)
        self.act = nn.LeakyReLU(0.01 if official else 0.2) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


@torch.no_grad()
def _xavier(module: nn.Module) -> None:
    """AA-CLIP's _init_weights_: xavier-uniform on every parameter with more than one dimension."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def mix_adapted(adapter: nn.Module, x: torch.Tensor, weight: float, eps: float = 1e-6) -> torch.Tensor:
    """AA-CLIP's residual: adapter output rescaled to each token's norm, then `w * adapted + (1 - w) * x`.

    x [..., W] -> [..., W]. With weight 0 the result is exactly x.
    """
    out = adapter(x)
    out = out * (x.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(eps))
    return weight * out + (1.0 - weight) * x


def _check_until(until: int, depth: int, key: str) -> None:
    if not 0 <= until <= depth:
        raise ConfigError(f"{key}={until}: the backbone has {depth} layers (use 0..{depth})")


class TextAdapters(nn.Module):
    """Residual adapters after the first `until` text layers plus a projection on the EOS token.

    The final projection (`final_proj`, a Linear without activation) replaces the CLIP text projection.
    AA-CLIP uses a randomly initialised Linear + LeakyReLU there, which throws away CLIP's zero-shot
    text space at step 0; here it is a plain Linear copied from the backbone's text projection by
    `for_backbone` / `init_projection`, so that the untrained adapters stay close to CLIP (only the
    `weight`-mixed layer adapters perturb it). `style="official"` builds AA-CLIP's modules instead (random
    xavier-initialised projection with LeakyReLU; see ADAPTER_STYLES).
    """

    def __init__(self, text_width: int, embed_dim: int, until: int = 3, weight: float = 0.1, style: str = "project"):
        super().__init__()
        self.until, self.weight, self.style = int(until), float(weight), _check_style(style)
        self.text_width, self.embed_dim = int(text_width), int(embed_dim)
        self.layer_adapters = nn.ModuleList(SimpleAdapter(text_width, style=style) for _ in range(self.until))
        self.final_proj = SimpleProj(text_width, embed_dim, relu=style == "official", style=style)
        if style == "official":
            _xavier(self)

    @classmethod
    def for_backbone(cls, backbone, until: int = 3, weight: float = 0.1, style: str = "project") -> "TextAdapters":
        """Adapters sized for `backbone` (a ClipBackbone); `project`: final projection copied from its text
        projection, `official`: random (AA-CLIP)."""
        _check_until(until, backbone.text_depth, "aaclip_text.adapt_until")
        adapters = cls(backbone.text_width, backbone.embed_dim, until, weight, style)
        if style == "project":
            adapters.init_projection(backbone)
        return adapters.to(_device(backbone))

    @torch.no_grad()
    def init_projection(self, backbone) -> None:
        """Copy the backbone's text projection ([W, E] parameter or nn.Linear) into `final_proj`."""
        text = getattr(backbone.model, "text", None) or backbone.model
        proj = text.text_projection
        if isinstance(proj, nn.Linear):
            self.final_proj.fc.weight.copy_(proj.weight)
            self.final_proj.fc.bias.copy_(proj.bias if proj.bias is not None else torch.zeros_like(self.final_proj.fc.bias))
        else:
            self.final_proj.fc.weight.copy_(proj.T)
            self.final_proj.fc.bias.zero_()

    def hook(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """After text layer i (0-based): x [T, n, W] -> [T, n, W] (adapted for i < until)."""
        return mix_adapted(self.layer_adapters[i], x, self.weight) if i < self.until else x

    def final(self, eos: torch.Tensor) -> torch.Tensor:
        """EOS token after ln_final [T, W] -> text embedding [T, E] (not normalised)."""
        return self.final_proj(eos)


class ImageAdapters(nn.Module):
    """Vision adapters after the first `until` ViT layers, per-level segmentation projections and a
    detection projection (all from the backbone width to the joint embedding dim); `style` see ADAPTER_STYLES."""

    def __init__(self, width: int, embed_dim: int, n_levels: int, until: int = 6, weight: float = 0.1,
                 style: str = "project"):
        super().__init__()
        self.until, self.weight, self.style = int(until), float(weight), _check_style(style)
        self.width, self.embed_dim, self.n_levels = int(width), int(embed_dim), int(n_levels)
        relu = style == "project"  # official train.py: --relu off, the projections are plain Linear layers
        self.layer_adapters = nn.ModuleList(SimpleAdapter(width, style=style) for _ in range(self.until))
        self.seg_proj = nn.ModuleList(SimpleProj(width, embed_dim, relu, style) for _ in range(self.n_levels))
        self.det_proj = SimpleProj(width, embed_dim, relu, style)
        if style == "official":
            _xavier(self)

    @classmethod
    def for_backbone(cls, backbone, until: int = 6, weight: float = 0.1, style: str = "project") -> "ImageAdapters":
        """Adapters sized for `backbone`; `until` is checked against its vision depth."""
        _check_until(until, backbone.depth, "aaclip_image.adapt_until")
        return cls(backbone.width, backbone.embed_dim, len(backbone.levels), until, weight,
                   style).to(_device(backbone))

    def check_backbone(self, backbone) -> None:
        """ConfigError unless these adapters fit `backbone` (depth, width, embed dim, number of levels)."""
        _check_until(self.until, backbone.depth, "aaclip_image.adapt_until")
        got = (backbone.width, backbone.embed_dim, len(backbone.levels))
        if got != (self.width, self.embed_dim, self.n_levels):
            raise ConfigError(
                f"image adapters are for width/embed/levels {(self.width, self.embed_dim, self.n_levels)}, "
                f"backbone {backbone.name} has {got} (check backbones.clip.name and backbones.clip.levels)")

    def hook(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """After vision layer i (0-based): x [B, 1+L, W] -> [B, 1+L, W] (adapted for i < until)."""
        return mix_adapted(self.layer_adapters[i], x, self.weight) if i < self.until else x

    def forward(self, backbone, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """images [B, 3, S, S] normalised -> (seg tokens: n_levels x [B, L, E] L2-normalised, det [B, E]).

        Level tokens have CLS removed and go through the frozen ln_post before the trainable projections;
        det = normalise(mean over patches of normalise(det_proj(ln_post(last level patches)))) (`official`: the
        mean is not re-normalised).
        """
        self.check_backbone(backbone)
        levels, _ = backbone.vision_tokens(images, self.hook)  # n_levels x [B, 1+L, W]
        ln_post = backbone.model.visual.ln_post
        patches = [ln_post(t[:, 1:]) for t in levels]  # n_levels x [B, L, W]
        seg = [F.normalize(proj(p), dim=-1) for proj, p in zip(self.seg_proj, patches)]
        det = F.normalize(self.det_proj(patches[-1]), dim=-1).mean(1)  # [B, E]
        return seg, (det if self.style == "official" else F.normalize(det, dim=-1))


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
