"""open_clip backbones: multi-level patch tokens, the global image embedding and a hookable text encoder.

The vision and text loops are written once here so that AA-CLIP adapters (and any other method that
needs to act between transformer layers) plug in through `hook(layer_index, x) -> x` instead of
re-implementing the forward pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_core.backbones.names import CONFIG_DIR, TINY_CLIP, register_configs  # noqa: F401 (re-exported)
from anomaly_core.backbones.weights import is_local_file, is_random
from anomaly_core.errors import ConfigError, WeightsError

Hook = Callable[[int, torch.Tensor], torch.Tensor]
RANDOM_INIT_SEED = 0  # untrained CLIP weights are a fixed function of the architecture


def is_open_clip_name(name: str) -> bool:
    import open_clip

    register_configs()
    return name in open_clip.list_models()


def _create_open_clip(name: str, pretrained: str | None, allow_partial: bool = False) -> tuple[nn.Module, list[str]]:
    """The open_clip model with its weights, and the tensors a local weights file left unloaded (refused unless
    `allow_partial`; they keep the seeded random initialisation)."""
    import open_clip

    register_configs()
    if is_random(pretrained):
        # the same "random" weights in every stage and process: features, text encoder and adapters must agree
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return open_clip.create_model(name, pretrained=None), []
    if is_local_file(pretrained):
        if not Path(pretrained).is_file():
            raise WeightsError(f"CLIP weights file not found: {pretrained} (set backbones.clip.pretrained to an "
                               "existing checkpoint)")
        from anomaly_core.backbones.timm_backbone import unloaded_error

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(name, pretrained=None)
        try:  # open_clip's own checkpoint conversion (prefixes, position-embedding resizing), then a lenient load
            incompatible = open_clip.load_checkpoint(model, pretrained, strict=False)
        except Exception as exc:
            raise WeightsError(f"{pretrained}: not a readable checkpoint for open_clip model {name} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
        missing = list(getattr(incompatible, "missing_keys", []) or [])
        if missing and not allow_partial:
            raise unloaded_error(pretrained, f"open_clip model {name}", missing, len(model.state_dict()))
        return model, missing
    try:
        return open_clip.create_model(name, pretrained=pretrained), []
    except Exception as exc:  # open_clip raises RuntimeError / hub errors when a tag cannot be fetched offline
        raise WeightsError(
            f"cannot load open_clip weights '{pretrained}' for {name} offline ({type(exc).__name__}); "
            f"download them elsewhere and set backbones.clip.pretrained=/path/to/open_clip_pytorch_model.bin"
        ) from exc


class ClipBackbone(nn.Module):
    """A frozen open_clip model with multi-level patch-token extraction.

    `levels` are 1-based transformer layer numbers whose outputs are returned (ViT-L: 6, 12, 18, 24).
    """

    kind = "clip"

    def __init__(self, name: str, pretrained: str | None, levels: Sequence[int], image_size: int | None = None,
                 allow_partial_weights: bool = False):
        super().__init__()
        import open_clip

        self.name, self.pretrained = name, "random" if is_random(pretrained) else str(pretrained)
        self.untrained = is_random(pretrained)
        model, self.missing_tensors = _create_open_clip(name, pretrained, allow_partial_weights)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        visual = self.model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ConfigError(f"backbones.clip.name={name}: only open_clip ViT image towers are supported")
        depth = len(visual.transformer.resblocks)
        self.levels = [int(v) for v in levels]
        bad = [v for v in self.levels if not 1 <= v <= depth]
        if bad:
            raise ConfigError(f"backbones.clip.levels={self.levels}: {name} has {depth} vision layers (use 1..{depth})")
        native = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
        self.image_size = int(image_size or native)
        if self.image_size != native:
            raise ConfigError(f"backbones.clip.image_size={self.image_size}: {name} expects {native}")
        self.patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
        self.grid = self.image_size // self.patch
        self.width = visual.transformer.width
        self.embed_dim = visual.proj.shape[1]
        self.depth = depth
        self.text_depth = len(self._text_transformer().resblocks)
        self.text_width = self._text_transformer().width
        self.mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)

    # ---------------------------------------------------------------- vision
    def vision_tokens(self, images: torch.Tensor, hook: Hook | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the vision tower. images [B,3,S,S] normalised -> (level tokens [B,1+L,W] each, final tokens [B,1+L,W]).

        `hook(i, x)` is called after layer i (0-based) and may return a modified x (batch-first).
        """
        visual = self.model.visual
        x = visual._embeds(images)  # [B, 1+L, W]
        batch_first = getattr(visual.transformer, "batch_first", True)
        wanted, out = set(self.levels), {}
        for i, block in enumerate(visual.transformer.resblocks):
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            if hook is not None:
                x = hook(i, x)
            if i + 1 in wanted:
                out[i + 1] = x
        return [out[v] for v in self.levels], x

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then proj: [B, L, W] -> [B, L, E]."""
        visual = self.model.visual
        return visual.ln_post(tokens) @ visual.proj

    def pool_global(self, final_tokens: torch.Tensor) -> torch.Tensor:
        """Global image embedding from the last layer's tokens: [B, 1+L, W] -> [B, E]."""
        visual = self.model.visual
        pooled, _ = visual._pool(final_tokens)
        return pooled @ visual.proj

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """images [B,3,S,S] -> {"levels": [B, L, E] per level (CLS removed), "global": [B, E]}."""
        levels, final = self.vision_tokens(images)
        return {"levels": [self.project_tokens(t[:, 1:]) for t in levels], "global": self.pool_global(final)}

    # ---------------------------------------------------------------- text
    def _text_transformer(self) -> nn.Module:
        text = getattr(self.model, "text", None)
        return text.transformer if text is not None else self.model.transformer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, token_ids: torch.Tensor, hook: Hook | None = None,
                    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    embed_hook: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Token ids [T, 77] -> text embeddings [T, E] (not normalised).

        `embed_hook(token_embeddings [T, 77, W]) -> [T, 77, W]` may replace token embeddings before the
        positional embedding is added (CoOp context vectors); `hook(i, x)` runs after text layer i (0-based);
        `final(eos_token [T, W]) -> [T, E]` replaces the text projection (AA-CLIP's projection after EOS).
        """
        m = getattr(self.model, "text", None) or self.model
        cast = self._text_transformer().get_cast_dtype()
        x = m.token_embedding(token_ids).to(cast)
        if embed_hook is not None:
            x = embed_hook(x)
        x = x + m.positional_embedding[: token_ids.shape[1]].to(cast)
        mask = m.attn_mask
        tr = self._text_transformer()
        batch_first = getattr(tr, "batch_first", True)
        for i, block in enumerate(tr.resblocks):
            x = block(x, attn_mask=mask) if batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
            if hook is not None:
                x = hook(i, x)
        x = m.ln_final(x)
        pool_type = getattr(m, "text_pool_type", None) or getattr(m, "pool_type", "argmax")
        eos = x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] if pool_type == "argmax" else x[:, -1]
        if final is not None:
            return final(eos)
        proj = m.text_projection
        return proj(eos) if isinstance(proj, nn.Linear) else eos @ proj

    @torch.no_grad()
    def text_anchors(self, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Average normalised embeddings of each prompt group: list of G prompt lists -> [G, E] normalised."""
        out = []
        for group in prompts:
            emb = F.normalize(self.encode_text(self.tokenize(group)), dim=-1)
            out.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(out)
