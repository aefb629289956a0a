"""The kNN bundle: what it holds, how it predicts (PyTorch engine) and its ONNX graph.

Bundle layout (`kind: knn`)::

    model.json                      card: method, kind, params, thresholds, val/test metrics, protocol, data hash
    backbone_<branch>.safetensors   the frozen backbone's weights (rebuilt from its name, then loaded)
    knn/<category>.safetensors      the kNN memory bank [M, D] of each category

A tiled bundle (`tiling.enabled`) holds `bank_<j>` per tile position (or one) instead of `bank`, and its card the
tiling (tile, stride, resolution, position_aware) and each category's tile offsets and tiled size; its PyTorch engine
re-reads the files at the tiling resolution; it has no ONNX graph (a one-line refusal).

Both engines score with `kit.knn.score_patches` (the pipeline's `PatchKnn.predict`): the PyTorch engine with the
blocked exact search, the ONNX graph with `kit.knn.dense_search` (one block, traceable), so they cannot drift.
"""
from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from anomaly_core.config import build
from anomaly_core.data.holdout import shot_rows
from anomaly_core.data.manifest import categories
from anomaly_core.deploy.bundle import FORMAT, BundleInputs, load_backbone, read_card, require_category, save_backbone
from anomaly_core.errors import DataError
from anomaly_core.io import load_tensors, save_tensors, write_json
from anomaly_core.kit.knn import KnnConfig, PatchKnn, dense_search, score_patches
from anomaly_core.kit.patches import clip_patches, cnn_patches, patch_grid
from anomaly_core.kit.tiling import TilingConfig, extract_tile_features, tiling_from
from anomaly_core.store import FeatureStore, level_list

__all__ = ["write_bundle", "Predictor", "onnx_graph", "load_bank"]

KIND = "knn"


def load_bank(bundle: Path, category: str) -> torch.Tensor:
    """The kNN memory bank [M, D] float32 of `category`."""
    return load_tensors(Path(bundle) / "knn" / f"{category}.safetensors")[0]["bank"]


def write_bundle(inputs: BundleInputs, out: Path, card: dict[str, Any]) -> dict:
    """Write a kNN bundle to `out`: the bank of every category (built exactly as the score stage builds it from
    the cached features), the backbone weights, and `model.json` = `card` + what `predict` needs."""
    out = Path(out)
    cfg = build(KnnConfig, inputs.params["score"][inputs.method]["knn"], "knn")  # what score@knn read
    store, rows = FeatureStore(inputs.features), inputs.rows
    tiling = tiling_from(inputs.params["score"][inputs.method])
    if tiling is not None:
        return write_tiled_bundle(inputs, out, card, cfg, tiling, store)
    grids = {cat: (lambda cat=cat: patch_grid(store, cfg.branch, shot_rows(rows, cat), cfg.patch_aggregate,
                                              cfg.patch_pad)) for cat in categories(rows)}
    banks = {}
    for cat, knn in PatchKnn.fit_each(grids, cfg, inputs.seed):
        save_tensors(out / "knn" / f"{cat}.safetensors", {"bank": knn.bank.contiguous()})  # [M, D] float32
        banks[cat] = list(knn.bank.shape)
    backbone = save_backbone(out, cfg.branch, inputs.params["backbones"][cfg.branch])
    card = {**card, "format": FORMAT, "exported": True, "kind": KIND, "image_size": inputs.size,
            "features_dtype": inputs.dtype, "knn": asdict(cfg), "backbone": {cfg.branch: backbone},
            "banks": banks, "categories": sorted(banks)}
    write_json(out / "model.json", card)
    return card


def write_tiled_bundle(inputs: BundleInputs, out: Path, card: dict[str, Any], cfg: KnnConfig, tiling,
                       store: FeatureStore) -> dict:
    """A tiled kNN bundle: `knn/<category>.safetensors` holds `bank_<j>` per tile position (`tiling.position_aware`)
    or one `bank_0`, built as score@knn builds them (`tiled.fit_category`); the card records the tiling (tile,
    stride, resolution) and each category's tile offsets and tiled size."""
    from anomaly_core.kit.tiled_knn import fit_category

    banks, tiles = {}, {}
    for cat in categories(inputs.rows):
        knn, offsets, hw = fit_category(store, inputs.rows, cat, cfg, tiling, inputs.seed)
        save_tensors(out / "knn" / f"{cat}.safetensors",
                     {f"bank_{j}": b.bank.contiguous() for j, b in enumerate(knn.banks)})  # [M, D] float32 each
        banks[cat] = [list(b.bank.shape) for b in knn.banks]
        tiles[cat] = {"offsets": offsets.tolist(), "hw": list(hw)}
    backbone = save_backbone(out, cfg.branch, inputs.params["backbones"][cfg.branch])
    card = {**card, "format": FORMAT, "exported": True, "kind": KIND, "image_size": inputs.size,
            "features_dtype": inputs.dtype, "knn": asdict(cfg), "backbone": {cfg.branch: backbone},
            "banks": banks, "categories": sorted(banks), "tiling": asdict(tiling), "tiles": tiles,
            "tile_batch": int(inputs.params["features"].get("batch_size", 16))}
    write_json(out / "model.json", card)
    return card


class Predictor:
    """The PyTorch engine of a kNN bundle: uint8 images [B, S, S, 3] -> (image scores [B], maps [B, size, size])."""

    transductive = False
    concurrent = True  # a call keeps no state on the object: predict scores batches on several threads at once

    def __init__(self, bundle: str | Path, card: dict | None = None):
        self.bundle = Path(bundle)
        self.card = card or read_card(self.bundle)
        self.cfg = build(KnnConfig, self.card["knn"], "model.json knn")
        self.branch, entry = next(iter(self.card["backbone"].items()))
        self.grid_side = entry.get("grid")
        self.backbone = load_backbone(self.bundle, entry)
        self.image_size = int(entry["image_size"])  # the backbone's input size
        self.size = int(self.card["image_size"])    # map resolution (data.image_size)
        self.dtype = getattr(torch, self.card["features_dtype"])
        self._banks: dict[str, torch.Tensor] = {}
        self._knn: dict[str, PatchKnn] = {}
        self.tiling = build(TilingConfig, self.card["tiling"], "model.json tiling") if "tiling" in self.card else None
        self.batch_size = int(self.card.get("tile_batch", 16))  # tiles per backbone call (features.batch_size)
        self._tiled: dict[str, Any] = {}
        self._lock = threading.RLock()  # concurrent calls load a category's bank once

    def bank(self, category: str) -> torch.Tensor:
        with self._lock:
            if category not in self._banks:
                require_category(self.card, category)
                self._banks = {category: load_bank(self.bundle, category)}  # one category's bank in memory
            return self._banks[category]

    def knn(self, category: str) -> PatchKnn:
        """The category's search (its bank's squared norms computed once, not per batch)."""
        with self._lock:
            if category not in self._knn:
                self._knn = {category: PatchKnn(self.bank(category), self.cfg)}
            return self._knn[category]

    def descriptors(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Backbone levels (float32, after the cache-dtype round trip) -> patch descriptors [B, h, w, D]."""
        if self.branch == "clip":
            return clip_patches(levels, self.grid_side)
        return cnn_patches(levels, self.cfg.patch_aggregate, self.cfg.patch_pad)

    @torch.no_grad()
    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> patch descriptors [B, h, w, D], exactly as the pipeline computes them."""
        from anomaly_core.features import encode_batch

        return self.descriptors([lvl.float() for lvl in level_list(encode_batch(self.backbone, images, self.dtype))])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, category: str, paths: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tiling is not None:
            return self.tiled(category, paths)
        return self.knn(category).predict(self.grid(images), self.size)

    @torch.no_grad()
    def tiled(self, category: str, paths: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A tiled bundle: the files re-read at the tiling resolution (the decoded 224 px batch is not used), cut
        into the category's tiles, encoded and scored against its banks as score@knn does (`TiledKnn.predict`)."""
        from anomaly_core.kit.tiled_knn import TiledKnn, flat_levels, tile_grids

        if paths is None:
            raise DataError(f"{self.bundle}: a tiled kNN bundle reads its images from their files (give paths)")
        entry = self.card["tiles"][category]
        offsets, hw = torch.tensor(entry["offsets"], dtype=torch.long), tuple(entry["hw"])
        with self._lock:  # concurrent calls (predict --workers) load a category's tile banks once
            if category not in self._tiled:
                require_category(self.card, category)
                tensors = load_tensors(self.bundle / "knn" / f"{category}.safetensors")[0]
                banks = [PatchKnn(tensors[f"bank_{j}"], self.cfg) for j in range(len(tensors))]
                self._tiled = {category: TiledKnn(banks, len(offsets), self.cfg, self.tiling)}
            tiled = self._tiled[category]
        images, maps = [], []
        for path in paths:  # one image at a time: its tiles are the batch, as in the features stage
            feats, got, ghw = extract_tile_features(self.backbone, [str(path)], self.tiling, self.batch_size,
                                                    self.dtype, max_pixels=2**62)  # predict checked --max-pixels
            if ghw != hw:
                raise DataError(f"{path}: {ghw[0]}x{ghw[1]} px at tiling resolution {self.tiling.resolution}, the "
                                f"bundle's category {category} was tiled at {hw[0]}x{hw[1]} px")
            image, m = tiled.predict(tile_grids(flat_levels(feats), self.cfg), offsets, hw, self.size)
            images.append(image)
            maps.append(m)
        return torch.cat(images), torch.cat(maps)


class KnnGraph(nn.Module):
    """The whole kNN scoring of one category as one traceable module (no Python loops over images or blocks):
    normalisation, backbone, cast to the cache dtype and back, patch descriptors, then `score_patches` with the
    bank as a constant and `dense_search`."""

    def __init__(self, predictor: Predictor, category: str):
        super().__init__()
        bb = predictor.backbone
        self.backbone, self.predictor, self.cfg = bb, predictor, predictor.cfg
        self.size, self.dtype = predictor.size, predictor.dtype
        bank = predictor.bank(category).float()  # [M, D]
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", (bank * bank).sum(1))  # [M]
        self.register_buffer("mean", torch.tensor(bb.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(bb.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images float [B, S, S, 3] in 0..255 -> (score [B], map [B, size, size])."""
        x = (images.permute(0, 3, 1, 2) / 255.0 - self.mean) / self.std  # [B, 3, S, S]
        grid = self.predictor.descriptors([lvl.to(self.dtype).float() for lvl in self.backbone(x)["levels"]])
        search = lambda q, k: dense_search(q, self.bank, self.bank_sq, k)
        return score_patches(grid, self.bank, self.cfg, self.size, search, search)


def onnx_graph(predictor: Predictor, category: str) -> nn.Module:
    """The traceable graph of one category: images float [B, S, S, 3] 0..255 -> (score [B], map [B, size, size]).
    A tiled bundle is refused in one line (its tiles, stitching and per-position banks are not in one graph)."""
    if predictor.tiling is not None:
        raise DataError(f"{predictor.bundle}: a tiled kNN bundle (model.json tiling: tile {predictor.tiling.tile}, "
                        f"stride {predictor.tiling.stride}); ONNX export takes untiled kNN bundles only: score it "
                        "with `predict --engine torch`")
    return KnnGraph(predictor, category)
