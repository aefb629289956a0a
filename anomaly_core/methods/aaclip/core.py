"""AA-CLIP building blocks shared by training and scoring: configs, class anchors, similarity maps,
the two stage losses and image scoring."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from anomaly_core.config import Checks
from anomaly_core.errors import ConfigError, DataError
from anomaly_core.kit.losses import orthogonal_loss, seg_loss
from anomaly_core.kit.maps import mix_image_score
from anomaly_core.kit.prompts import build_prompts
from anomaly_core.methods.aaclip.modules import ADAPTER_STYLES, ImageAdapters, TextAdapters

__all__ = [
    "LOGIT_SCALE", "TextAdapterConfig", "ImageAdapterConfig", "class_anchors", "encode_prompts",
    "similarity_map", "test_map", "text_stage_loss", "image_stage_loss", "encode_images", "score_images",
    "stack_anchors", "check_image_size", "det_probability", "SCORING", "official_test_map", "official_scores",
]

LOGIT_SCALE = 100.0
"""Logit scale for every patch/image-vs-anchor cosine (CLIP's trained logit scale, AA-CLIP's map scale).
The stage-2 classification loss uses it too (AA-CLIP feeds raw cosines to the cross-entropy, which leaves
the loss almost flat around log 2); with 100 the det-token softmax is the same one used for scoring."""


# ------------------------------------------------------------------------------------------ configs
@dataclass
class TextAdapterConfig:
    """Stage 1 (text adapters). `adapt_until` is checked against the text depth when adapters are built; with
    `dpam` the image tokens of every batch come from the images through DPAM blocks (dpam.py), not the cache."""
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-5
    adapt_until: int = 3
    adapt_weight: float = 0.1
    text_norm_weight: float = 0.1
    seed: int = 0
    adapter: str = "project"   # project | official (Mwxinnn/AA-CLIP's modules; see modules.ADAPTER_STYLES)
    dpam: bool = False         # train on DPAM tokens of each batch (official train.py) instead of the cached ones
    dpam_layer: int = 20       # train.py --surgery_until_layer: DPAM in the last dpam_layer - 1 vision blocks

    def validate(self, section: str = "aaclip_text") -> None:
        Checks(section).positive(batch_size=self.batch_size, lr=self.lr) \
            .that(self.dpam_layer >= 2, "dpam_layer", self.dpam_layer, "an integer >= 2 (train.py: 20)") \
            .non_negative(epochs=self.epochs, adapt_until=self.adapt_until, text_norm_weight=self.text_norm_weight) \
            .that(self.adapter in ADAPTER_STYLES, "adapter", self.adapter, f"one of {list(ADAPTER_STYLES)}") \
            .unit(adapt_weight=self.adapt_weight).done()


@dataclass
class ImageAdapterConfig:
    """Stage 2 (image adapters). `image_size` must equal the backbone's input size; `milestones` count
    optimizer steps (after gradient accumulation); `sigma`/`ksize` smooth the patch-grid test maps;
    `augment` turns the stage-2 kornia augmentation off (ablations / tests)."""
    epochs: int = 20
    batch_size: int = 2
    accum_steps: int = 1
    lr: float = 5e-4
    adapt_until: int = 6
    adapt_weight: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [16000, 32000])
    gamma: float = 0.5
    image_size: int = 518
    sigma: float = 1.0
    ksize: int = 7
    image_weight: float = 0.5
    seed: int = 0
    augment: bool = True
    adapter: str = "project"   # project | official (AA-CLIP's modules, raw-cosine CE; modules.ADAPTER_STYLES)

    def validate(self, section: str = "aaclip_image") -> None:
        Checks(section).positive(batch_size=self.batch_size, accum_steps=self.accum_steps, lr=self.lr,
                                 gamma=self.gamma, image_size=self.image_size, ksize=self.ksize) \
            .non_negative(epochs=self.epochs, adapt_until=self.adapt_until, sigma=self.sigma) \
            .that(self.ksize % 2 == 1, "ksize", self.ksize, "must be odd") \
            .that(self.adapter in ADAPTER_STYLES, "adapter", self.adapter, f"one of {list(ADAPTER_STYLES)}") \
            .that(all(m > 0 for m in self.milestones), "milestones", self.milestones, "optimizer steps > 0") \
            .unit(adapt_weight=self.adapt_weight, image_weight=self.image_weight).done()


def check_image_size(cfg: ImageAdapterConfig, backbone) -> None:
    """ConfigError unless cfg.image_size is the backbone's input size (ClipBackbone does not resize
    positional embeddings, so AA-CLIP's 518 px needs a backbone built for 518)."""
    if cfg.image_size != backbone.image_size:
        raise ConfigError(f"aaclip_image.image_size={cfg.image_size}: backbone {backbone.name} takes "
                          f"{backbone.image_size} px inputs (set it to {backbone.image_size})")


# ------------------------------------------------------------------------------------------ text
def _text_module(backbone):
    return getattr(backbone.model, "text", None) or backbone.model


@contextmanager
def _causal_prefix(backbone, n: int) -> Iterator[bool]:
    """Temporarily slice the text attention mask to n x n. Yields False (nothing changed) unless the mask
    is causal and pooling takes the EOS token, the case where dropping the padding after the last EOS
    leaves every EOS output exactly unchanged."""
    text = _text_module(backbone)
    mask = getattr(text, "attn_mask", None)
    pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
    causal = (mask is not None and mask.dim() == 2 and mask.shape[0] > n and pool == "argmax"
              and torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)))
    if not causal:
        yield False
        return
    text.attn_mask = mask[:n, :n]
    try:
        yield True
    finally:
        text.attn_mask = mask


def encode_prompts(backbone, token_ids: torch.Tensor, adapters: TextAdapters | None = None) -> torch.Tensor:
    """Token ids [T, 77] -> text embeddings [T, E] (not normalised), through the adapters when given.

    The padding after the longest prompt's EOS is cut off when the text mask is causal (CLIP), which
    gives the same embeddings ~5x faster (prompts are ~16 of 77 tokens).
    """
    hook, final = (adapters.hook, adapters.final) if adapters is not None else (None, None)
    n = int(token_ids.argmax(dim=-1).max()) + 1
    with _causal_prefix(backbone, n) as short:
        ids = token_ids[:, :n] if short else token_ids
        return backbone.encode_text(ids, hook=hook, final=final)


def class_anchors(backbone, text_adapters: TextAdapters | None, class_names: Sequence[str],
                  prompts: Callable[[str], tuple[list[str], list[str]]] = build_prompts) -> torch.Tensor:
    """Class names -> [C, 2, E] normalised (normal, abnormal) anchors from the prompt ensemble.

    Each anchor is the normalised mean of the normalised prompt embeddings. No torch.no_grad here:
    gradients reach the text adapters when they train (wrap the call yourself for inference).
    `prompts(class name) -> (normal prompts, abnormal prompts)` (default: the kit's ensemble).
    """
    device = next(backbone.parameters()).device
    out = []
    for name in class_names:
        normal, abnormal = prompts(name)
        ids = backbone.tokenize(normal + abnormal).to(device)  # [Pn + Pa, 77]
        emb = F.normalize(encode_prompts(backbone, ids, text_adapters), dim=-1)  # [Pn + Pa, E]
        groups = [emb[: len(normal)].mean(0), emb[len(normal):].mean(0)]
        out.append(F.normalize(torch.stack(groups), dim=-1))  # [2, E]
    return torch.stack(out)


def stack_anchors(anchors_by_class: dict[str, torch.Tensor], class_names: Sequence[str]) -> torch.Tensor:
    """Per-sample anchors: {class: [2, E]} and B class names -> [B, 2, E] (DataError for an unknown class)."""
    missing = sorted(set(class_names) - set(anchors_by_class))
    if missing:
        raise DataError(f"no AA-CLIP text anchors for class(es) {missing} (known: {sorted(anchors_by_class)}); "
                        f"re-run the text-adapter stage on these categories")
    return torch.stack([anchors_by_class[c] for c in class_names])


# ------------------------------------------------------------------------------------------ maps
def _grid_logits(tokens: torch.Tensor, anchors: torch.Tensor, grid: int, scale: float) -> torch.Tensor:
    """tokens [B, L, E], anchors [B, 2, E] or [2, E] -> logits on the patch grid [B, 2, grid, grid]."""
    b, length, _ = tokens.shape
    if length != grid * grid:
        raise DataError(f"{length} patch tokens do not form a {grid}x{grid} grid (features from another backbone?)")
    a = anchors.expand(b, -1, -1) if anchors.dim() == 2 else anchors  # [B, 2, E]
    logits = scale * tokens @ a.transpose(1, 2)  # [B, L, 2]
    return logits.transpose(1, 2).reshape(b, 2, grid, grid)


def similarity_map(tokens: torch.Tensor, anchors: torch.Tensor, grid: int, out_size: int,
                   scale: float = LOGIT_SCALE) -> torch.Tensor:
    """tokens [B, L, E], anchors [B, 2, E] -> logits [B, 2, out, out] (bilinear upsampling of the grid with
    align_corners=True, as AA-CLIP's forward_utils.calculate_similarity_map; apply softmax over dim 1 for the
    training probabilities)."""
    logits = _grid_logits(tokens, anchors, grid, scale)
    return F.interpolate(logits, size=(out_size, out_size), mode="bilinear", align_corners=True)


def test_map(tokens: torch.Tensor | Sequence[torch.Tensor], anchors: torch.Tensor, grid: int, out_size: int,
             sigma: float = 1.0, ksize: int = 7, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Test-time anomaly map: tokens [B, L, E] (or a list of levels, averaged) -> [B, out, out] in [0, 1].

    Per level: p = softmax of the patch logits, map = (p_abnormal + 1 - p_normal) / 2 on the grid, Gaussian
    blur (kornia, ksize x ksize, sigma; skipped for sigma 0), bilinear upsampling.
    """
    if not isinstance(tokens, torch.Tensor):
        return torch.stack([test_map(t, anchors, grid, out_size, sigma, ksize, scale) for t in tokens]).mean(0)
    p = _grid_logits(tokens, anchors, grid, scale).softmax(dim=1)  # [B, 2, g, g]
    m = ((p[:, 1] + 1.0 - p[:, 0]) / 2.0)[:, None]  # [B, 1, g, g]
    if sigma > 0:
        import kornia

        m = kornia.filters.gaussian_blur2d(m, (ksize, ksize), (sigma, sigma), border_type="reflect")
    return F.interpolate(m, size=(out_size, out_size), mode="bilinear", align_corners=False)[:, 0]


test_map.__test__ = False  # not a pytest test when imported into a test module

SCORING = ("softmax", "official")
"""`aaclip.scoring`: softmax (ours: test_map, det softmax probability; per-image scores in [0, 1]) or official
(Mwxinnn/AA-CLIP test.py: official_test_map / official_scores, min-max normalised over the scored set)."""


def official_test_map(tokens: Sequence[torch.Tensor], anchors: torch.Tensor, grid: int, out_size: int,
                      sigma: float = 1.0, ksize: int = 7) -> torch.Tensor:
    """test.py's raw map: per level forward_utils.calculate_similarity_map(test=True) = blur((l_abnormal + 1 -
    l_normal) / 2) of the raw 100 cos logits, bilinear upsampling with align_corners=True; summed over the levels.
    tokens n_levels x [B, L, E], anchors [B, 2, E] -> [B, out, out] (not in [0, 1])."""
    total = None
    for t in tokens:
        logits = _grid_logits(t, anchors, grid, LOGIT_SCALE)  # [B, 2, g, g]
        m = ((logits[:, 1] + 1.0 - logits[:, 0]) / 2.0)[:, None]  # [B, 1, g, g]
        if sigma > 0:
            import kornia  # here, not at import (validate reads this module's configs)

            m = kornia.filters.gaussian_blur2d(m, (ksize, ksize), (sigma, sigma), border_type="reflect")
        m = F.interpolate(m, size=(out_size, out_size), mode="bilinear", align_corners=True)[:, 0]
        total = m if total is None else total + m
    return total


def official_scores(det: torch.Tensor, anchors: torch.Tensor, maps: torch.Tensor, image_weight: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """test.py's scores of ONE scored set (its images of one class): det [N, E], anchors [N, 2, E], raw maps
    [N, S, S] (official_test_map) -> (image scores [N], maps [N, S, S]). Image pred (det . abnormal + 1) / 2;
    forward_utils.metrics_eval min-max normalises maps and image preds over the set (unless their max is
    exactly 1) and scores w * image + (1 - w) * max(map) (Industrial domain, w 0.5). Each score depends on the
    other images of the set."""
    def minmax_set(x: torch.Tensor) -> torch.Tensor:
        return x if float(x.max()) == 1.0 else (x - x.min()) / (x.max() - x.min())

    image = ((det[:, None, :] * anchors).sum(-1)[:, 1] + 1.0) / 2.0  # [N]
    maps = minmax_set(maps)
    return mix_image_score(minmax_set(image), maps, image_weight), maps


# ------------------------------------------------------------------------------------------ losses
def text_stage_loss(levels: Sequence[torch.Tensor], global_emb: torch.Tensor, masks: torch.Tensor,
                    anchors: torch.Tensor, grid: int, text_norm_weight: float = 0.1
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-1 loss: SUM over ALL levels of seg_loss + text_norm_weight * orthogonal_loss(anchors).

    levels: [B, L, E] frozen patch tokens (after ln_post + proj) per level; global_emb [B, E];
    masks [B, S, S]; anchors [B, 2, E] per-sample normalised anchors -> (scalar loss, float parts).
    As in AA-CLIP, the normalised global embedding is added to every normalised patch token.
    (AA-CLIP's train.py overwrites the loss inside the level loop so only the last level counts; fixed.)
    """
    g = F.normalize(global_emb.float(), dim=-1)[:, None]  # [B, 1, E]
    seg = anchors.new_zeros(())
    for t in levels:  # accumulate: every level contributes
        seg = seg + seg_loss(similarity_map(F.normalize(t.float(), dim=-1) + g, anchors, grid, masks.shape[-1])
                             .softmax(dim=1), masks)
    orth = orthogonal_loss(anchors)
    return seg + text_norm_weight * orth, {"seg": float(seg.detach()), "orth": float(orth.detach())}


def image_stage_loss(seg_tokens: Sequence[torch.Tensor], det: torch.Tensor, anchors: torch.Tensor,
                     masks: torch.Tensor, labels: torch.Tensor, grid: int, ce_scale: float = LOGIT_SCALE
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-2 loss: CE(ce_scale * det . anchors, label) + SUM over levels of seg_loss.

    seg_tokens: [B, L, E] normalised per level; det [B, E]; anchors [B, 2, E]; masks [B, S, S];
    labels [B] (0 normal, 1 anomalous) -> (scalar loss, float parts). AA-CLIP's train.py uses ce_scale 1
    (raw cosines; the `official` adapter style does too).
    """
    logits = ce_scale * (det[:, None, :] * anchors).sum(-1)  # [B, 2]
    cls = F.cross_entropy(logits.float(), labels.long())
    seg = det.new_zeros((), dtype=torch.float32)
    for t in seg_tokens:
        seg = seg + seg_loss(similarity_map(t.float(), anchors, grid, masks.shape[-1]).softmax(dim=1), masks)
    return cls + seg, {"cls": float(cls.detach()), "seg": float(seg.detach())}


# ------------------------------------------------------------------------------------------ scoring
def encode_images(backbone, image_adapters: ImageAdapters | None, x: torch.Tensor
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """x [B, 3, S, S] normalised -> (seg tokens n_levels x [B, L, E], det [B, E] normalised).

    Without image adapters (text adapters only), the tokens are the frozen ln_post+proj patch tokens,
    normalised, plus the normalised global embedding (exactly what stage 1 trained the anchors on), and
    det is the normalised global embedding.
    """
    if image_adapters is not None:
        return image_adapters(backbone, x)
    levels, final = backbone.vision_tokens(x)
    g = F.normalize(backbone.pool_global(final), dim=-1)  # [B, E]
    seg = [F.normalize(backbone.project_tokens(t[:, 1:]), dim=-1) + g[:, None] for t in levels]
    return seg, g


def det_probability(det: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """det [B, E], anchors [B, 2, E] -> softmax abnormal probability [B] at LOGIT_SCALE."""
    return (LOGIT_SCALE * (det[:, None, :] * anchors).sum(-1)).softmax(-1)[:, 1]


@torch.no_grad()
def score_images(backbone, image_adapters: ImageAdapters | None, anchors_by_class: dict[str, torch.Tensor],
                 images: torch.Tensor, class_names: Sequence[str], cfg: ImageAdapterConfig,
                 out_size: int | None = None, batch_size: int = 8, scoring: str = "softmax"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 [N, H, W, 3], N class names -> (image scores [N], maps [N, out, out]) on CPU, float32.

    scoring softmax (default): maps = test_map averaged over levels (cfg.sigma, cfg.ksize), image score
    cfg.image_weight * p_abnormal(det) + (1 - cfg.image_weight) * max(map), both in [0, 1], per image.
    scoring official (test.py): official_test_map + official_scores, min-max normalised over the N images (one
    class), so a score depends on the other images of the call.
    `out_size` defaults to the backbone input size; pass data.image_size for the score files.
    """
    from anomaly_core.backbones import preprocess

    if len(class_names) != len(images):
        raise DataError(f"{len(images)} images but {len(class_names)} class names")
    device = next(backbone.parameters()).device
    out_size = int(out_size or backbone.image_size)
    if scoring not in SCORING:
        raise ConfigError(f"aaclip.scoring={scoring!r}: one of {list(SCORING)}")
    if image_adapters is not None:
        image_adapters.eval()
    scores, maps, raw = [], [], []
    for s in range(0, len(images), batch_size):
        x = preprocess(images[s: s + batch_size], backbone.image_size, backbone.mean, backbone.std).to(device)
        a = stack_anchors(anchors_by_class, class_names[s: s + batch_size]).to(device).float()  # [b, 2, E]
        seg, det = encode_images(backbone, image_adapters, x)
        seg, det = [t.float() for t in seg], det.float()
        if scoring == "official":  # normalised below, over every image of this call
            raw.append((det.cpu(), a.cpu(), official_test_map(seg, a, backbone.grid, out_size, cfg.sigma,
                                                              cfg.ksize).cpu()))
            continue
        m = test_map(seg, a, backbone.grid, out_size, cfg.sigma, cfg.ksize)  # [b, S, S]
        p = det_probability(det, a)
        scores.append(mix_image_score(p, m, cfg.image_weight).cpu())
        maps.append(m.cpu())
    if scoring == "official":
        if len(set(class_names)) > 1:
            raise DataError(f"aaclip.scoring=official normalises over one class's images; got {sorted(set(class_names))}")
        return official_scores(*(torch.cat(t) for t in zip(*raw)), cfg.image_weight)
    return torch.cat(scores), torch.cat(maps)
