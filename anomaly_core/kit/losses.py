"""Losses: segmentation and text-anchor losses of AA-CLIP (focal, dice, their sum, orthogonality) and the
class-balanced 2-way cross-entropy of multi-prototype and CoOp."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["focal_loss", "dice_loss", "seg_loss", "orthogonal_loss", "balanced_ce"]


def _mask4(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] or [B, 1, H, W] -> [B, 1, H, W] float."""
    return (mask[:, None] if mask.dim() == 3 else mask).float()


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0,
               alpha: Sequence[float] | None = None, smooth: float = 1e-5) -> torch.Tensor:
    """Multi-class focal loss on probabilities, as AA-CLIP / AnomalyCLIP compute it.

    probs [B, K, H, W] (softmax over K; K = 2 normal/abnormal), mask [B, 1, H, W] or [B, H, W] with the
    class index per pixel (a soft 0/1 mask is thresholded at 0.5) -> scalar.
    The one-hot target is clamped to [smooth/(K-1), 1-smooth] and pt = <target, probs> + smooth, then
    loss = mean(-alpha[target] * (1 - pt)^gamma * log(pt)). `alpha` (one weight per class) defaults to 1.
    """
    k = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, k)  # [P, K]
    target = (_mask4(mask) > 0.5).long().reshape(-1) if k == 2 else _mask4(mask).long().reshape(-1)  # [P]
    one_hot = torch.zeros_like(p).scatter_(1, target[:, None], 1.0)
    if smooth:
        one_hot = one_hot.clamp(smooth / (k - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(1) + smooth  # [P]
    weight = torch.ones(k, dtype=p.dtype, device=p.device) if alpha is None else torch.as_tensor(
        alpha, dtype=p.dtype, device=p.device)
    return (-weight[target] * (1.0 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary dice per sample, averaged: pred, target [B, H, W] -> 1 - mean((2|XY| + s) / (|X| + |Y| + s))."""
    x, y = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1).to(pred.dtype)  # [B, HW]
    dice = (2.0 * (x * y).sum(1) + smooth) / (x.sum(1) + y.sum(1) + smooth)  # [B]
    return 1.0 - dice.mean()


def seg_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """probs [B, 2, H, W] (normal, abnormal), mask [B, 1, H, W] or [B, H, W] -> focal + dice(normal, 1-mask)
    + dice(abnormal, mask)."""
    m = _mask4(mask)[:, 0]  # [B, H, W]
    return focal_loss(probs, m) + dice_loss(probs[:, 0], 1.0 - m) + dice_loss(probs[:, 1], m)


def orthogonal_loss(anchors: torch.Tensor) -> torch.Tensor:
    """(mean over rows of normal . abnormal)^2.

    anchors [C, 2, E] (this package's layout: dim 1 is normal/abnormal) or [B, E, 2] (AA-CLIP's layout,
    recognised when dim 1 is not 2) -> scalar.
    """
    a = anchors if anchors.shape[1] == 2 else anchors.transpose(1, 2)  # [C, 2, E]
    return (a[:, 0] * a[:, 1]).sum(-1).mean().pow(2)


def balanced_ce(logits_normal: torch.Tensor, logits_abnormal: torch.Tensor) -> torch.Tensor:
    """Class-balanced 2-way cross-entropy: mean over the present classes of the per-class mean CE.

    logits_normal [Pn, 2] (target 0), logits_abnormal [Pa, 2] (target 1); an empty side is skipped.
    """
    terms = []
    if logits_normal.shape[0]:
        terms.append(F.cross_entropy(logits_normal, torch.zeros(logits_normal.shape[0], dtype=torch.long)))
    if logits_abnormal.shape[0]:
        terms.append(F.cross_entropy(logits_abnormal, torch.ones(logits_abnormal.shape[0], dtype=torch.long)))
    if not terms:
        raise ValueError("balanced_ce: no samples")
    return torch.stack(terms).mean()
