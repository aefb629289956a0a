"""Stage 1's DPAM image tokens, computed as Mwxinnn/AA-CLIP's train.py computes them (opt-in: `aaclip_text.dpam`).

The official stage 1 reads its patch tokens from a copy of CLIP after `visual.DAPM_replace(surgery_until_layer)`
(default 20): the attention of the last `dpam_layer - 1` vision blocks is replaced by a v-v self-attention
(softmax(v v^T * scale) v, then out_proj; the q-k path is computed and dropped). AA-CLIP's replacement attention
takes its input as [B, N, C] but receives the sequence-first [L, B, C] tensor of its transformer, so its "v-v
attention" runs over the images of the batch at each token position, not over the tokens of an image: an image's
tokens depend on the other images of its batch (a batch of one gives out_proj(v)). We reproduce that exactly
(`dpam_levels` on the training batch); the tokens cannot be cached per image in the features stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_core.errors import ConfigError

__all__ = ["dpam_blocks", "dpam_attention", "dpam_levels"]


def dpam_blocks(depth: int, dpam_layer: int) -> int:
    """Number of final vision blocks with DPAM for train.py's --surgery_until_layer `dpam_layer` (its loop
    `for i in range(1, dpam_layer)` replaces resblocks[-i]); ConfigError unless 1 <= dpam_layer - 1 <= depth."""
    n = dpam_layer - 1
    if not 1 <= n <= depth:
        raise ConfigError(f"aaclip_text.dpam_layer={dpam_layer}: DPAM replaces the last dpam_layer - 1 vision blocks "
                          f"and this CLIP has {depth} (use 2..{depth + 1}; ViT-L-14-336 / train.py: 20)")
    return n


def dpam_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """AA-CLIP's DPAM attention of one block: x [B, L, W] (ln_1 applied) -> [B, L, W].

    Per token position l and head h: softmax over the B images of (v_l v_l^T * head_dim^-0.5), times v_l."""
    b, length, width = x.shape
    heads = attn.num_heads
    v = F.linear(x, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])  # [B, L, W]
    v = v.reshape(b, length, heads, width // heads).permute(1, 2, 0, 3)               # [L, H, B, d]
    w = ((v @ v.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)        # [L, H, B, B]
    out = (w @ v).permute(2, 0, 1, 3).reshape(b, length, width)                        # [B, L, W]
    return attn.out_proj(out)


def _dpam_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock with its attention replaced by DPAM: [B, L, W] -> [B, L, W]."""
    x = x + block.ls_1(dpam_attention(block.attn, block.ln_1(x)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@torch.no_grad()
def dpam_levels(visual: nn.Module, images: torch.Tensor, levels: list[int], dpam_layer: int) -> list[torch.Tensor]:
    """open_clip VisionTransformer, images [B, 3, S, S] normalised (one training batch), 1-based `levels` -> per
    level the patch tokens [B, L, E] after ln_post @ proj, with DPAM in the last dpam_layer - 1 blocks (not
    normalised, as train.py before its norm)."""
    blocks = visual.transformer.resblocks
    first = len(blocks) - dpam_blocks(len(blocks), dpam_layer)
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = visual._embeds(images)  # [B, 1+L, W]
    wanted, out = set(levels), {}
    for i, block in enumerate(blocks):
        if i >= first:
            x = _dpam_block(block, x)
        else:
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        if i + 1 in wanted:
            out[i + 1] = x
    return [visual.ln_post(out[v][:, 1:]) @ visual.proj for v in levels]
