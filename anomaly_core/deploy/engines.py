"""The PyTorch engine of any bundle, asked of the method that wrote it (`Method.deploy`, else the generic bundle),
and the fusion's engine (both branches' engines, standardised and mixed as the `fuse` stage).

An engine: `engine(images uint8 [B, S, S, 3], category, paths) -> (image scores [B], maps [B, size, size])`, with
`image_size` (its decoding size) and `transductive`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from anomaly_core.deploy import generic
from anomaly_core.deploy.bundle import read_card
from anomaly_core.errors import DataError
from anomaly_core.features import load_batch
from anomaly_core.methods import REGISTRY, get_method

__all__ = ["load_predictor", "FusionPredictor", "deploy_module"]


def deploy_module(method: str):
    """The module that writes and scores `method`'s bundles: its own (`Method.deploy`) or the generic one."""
    return get_method(method).deploy_module() or generic


class FusionPredictor:
    """The engine of a `fusion` bundle: both branches' engines, standardised and mixed as the `fuse` stage."""

    def __init__(self, bundle: str | Path, card: dict | None = None):
        self.bundle = Path(bundle)
        self.card = card or read_card(self.bundle)
        if self.card["kind"] != "fusion":
            raise DataError(f"{self.bundle}: kind {self.card['kind']!r}, this engine scores fusion bundles")
        self.members = {b: load_predictor(self.bundle / m["dir"]) for b, m in self.card["members"].items()}
        self.image_size = self.members["clip"].image_size
        self.transductive = any(m.transductive for m in self.members.values())
        self.concurrent = all(getattr(m, "concurrent", False) for m in self.members.values())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, category: str, paths: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from anomaly_core.fusion import apply_fusion_model

        out = {}
        for branch, model in self.members.items():
            batch = images
            if model.image_size != images.shape[1]:
                batch = load_batch(paths, model.image_size)
            out[branch] = model(batch, category, paths)
        return apply_fusion_model(self.card["fusion"], category, out["clip"], out["visual"])


def load_predictor(bundle: str | Path, card: dict | None = None):
    """The PyTorch engine of a bundle: the fusion's, or that of the method that wrote it."""
    card = card or read_card(Path(bundle))
    if card.get("kind") == "fusion":
        return FusionPredictor(bundle, card)
    if card.get("method") not in REGISTRY:
        raise DataError(f"{bundle}/model.json: method {card.get('method')!r} is not a registered method "
                        f"(this version has {', '.join(REGISTRY)})")
    return deploy_module(card["method"]).Predictor(bundle, card)
