"""The generic bundle (`kind: method`) of any method without a deploy module of its own: the method's own `score`
(the code of its `score` stage) runs on the new images, so a bundle scores exactly as the pipeline.

Layout::

    model.json                      card + `score_params` (what the score stage reads), `features_info`
    backbone_<branch>.safetensors   the backbones of the feature branches the method reads
    model/                          data/models/<method>: fitted states (state/<category>.pt) and the outputs
                                    of its training stages (AA-CLIP: text.pt, image.pt)
    shots/<branch>/<category>.safetensors   cached features of the train shots (methods whose score builds a
                                    memory bank from them: vpt_knn), stored in `features.dtype` with their ids
                                    (and, for a tiled branch, their tile offsets and tiled size)

`Predictor` gives the method a feature store (`BatchStore`) holding the new images as `test` rows (and the
shots' stored features); features are extracted only for the branches the method reads, through the features
stage's path (backbone, cast to `features.dtype`, back to float32); a branch cached with tiling
(`features_info[branch]["tiling"]`) is re-read from the files at the tiling resolution and cut into its tiles as
the features stage does (`kit.tiling.extract_tile_features`). A transductive method (MuSc) scores every
image passed to one call of a category as one unlabeled pool: its scores depend on that set.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from anomaly_core.data.holdout import shot_rows
from anomaly_core.data.manifest import Row, categories
from anomaly_core.deploy.bundle import FORMAT, BundleInputs, load_backbone, read_card, require_category, save_backbone
from anomaly_core.errors import ConfigError, DataError
from anomaly_core.features import encode_batch, load_batch
from anomaly_core.io import load_tensors, save_tensors, write_json
from anomaly_core.methods import get_method
from anomaly_core.methods.base import context_for, states_path
from anomaly_core.store import FeatureStore, level_list

__all__ = ["write_bundle", "Predictor", "BatchStore", "NEW", "KIND"]

KIND = "method"


def write_bundle(inputs: BundleInputs, out: Path, card: dict[str, Any]) -> dict:
    """Write a `method` bundle to `out` (layout in the module docstring): what the method's score stage reads,
    copied (its params subset, fitted states, training-stage outputs), the backbones of its feature branches and,
    when its score reads them, the shots' cached features. Returns the card."""
    method, rows, features, models = inputs.method, inputs.rows, inputs.features, inputs.models
    if method not in inputs.params.get("score", {}):
        raise DataError(f"export: no score params for {method} in the export config; re-run `dvc repro validate`")
    score_params, backbones_raw, m = inputs.params["score"][method], inputs.params["backbones"], get_method(method)
    why = m.unexportable(score_params) if m.unexportable is not None else ""
    if why:
        raise ConfigError(f"export of {method}: {why}")
    dtype, size, out = inputs.dtype, inputs.size, Path(out)
    branches = list(m.branches(score_params))
    store = FeatureStore(features)
    missing = [b for b in branches if not store.has(b)]
    if missing:
        raise DataError(f"{features}/info.json: no cached {missing[0]} features, which {method} reads")
    if Path(models).is_dir():
        shutil.copytree(models, out / "model", ignore=shutil.ignore_patterns("SKIPPED"))
    else:
        (out / "model").mkdir(parents=True)
    shots = {}
    if m.shot_features:
        for b in branches:
            for cat in categories(rows):
                part = shot_rows(rows, cat)
                feats = store.get(b, part)
                meta = {"ids": [r.id for r in part]}
                if "tiling" in store.info[b]:  # [S, T, C, h, w] with the tiles' positions
                    offsets, hw = store.tiles(b, part)
                    meta.update(tiles=offsets.tolist(), tiled_hw=list(hw))
                save_tensors(out / "shots" / b / f"{cat}.safetensors",
                             {k: v.to(getattr(torch, dtype)).contiguous() for k, v in feats.items()}, meta)
                shots[cat] = len(part)
    card = {**card, "format": FORMAT, "exported": True, "kind": KIND, "method": method, "image_size": size,
            "features_dtype": dtype, "score_params": score_params, "transductive": m.transductive,
            "features_info": {b: store.info[b] for b in branches},
            "backbone": {b: save_backbone(out, b, backbones_raw[b]) for b in branches},
            "shots": shots, "categories": categories(rows)}
    if any("tiling" in store.info[b] for b in branches):  # tiles per backbone call in predict (features.batch_size)
        card["tile_batch"] = int(inputs.params.get("features", {}).get("batch_size", 16))
    write_json(out / "model.json", card)
    return card


NEW = "predict/"  # id prefix of the rows of the images being scored (never a manifest id: those have no "/" prefix)


class BatchStore:
    """The `FeatureStore` interface (`info`, `has`, `get`, `levels`) over the bundle's stored shot features and
    the images being scored. A branch's features of the new images are extracted on first request (the method
    reads only its branches), through the feature stage's path: backbone, cast to `dtype`, back to float32."""

    def __init__(self, info: dict, backbones: dict, dtype: torch.dtype, shots: dict[str, dict[str, torch.Tensor]],
                 shot_ids: list[str], shot_tiles: dict[str, tuple[torch.Tensor, tuple[int, int]]] | None = None,
                 tile_batch: int = 16, category: str = ""):
        self.info, self.backbones, self.dtype = info, backbones, dtype
        self._shots = shots                      # {branch: {key: [n_shots, ...]}} in `shot_ids` order
        self._shot_tiles = shot_tiles or {}      # {tiled branch: (offsets [T, 2], tiled (H, W))} of the shots
        self._tile_batch, self._category = tile_batch, category
        self._shot_index = {i: n for n, i in enumerate(shot_ids)}
        self._new: dict[str, dict[str, torch.Tensor]] = {}
        self._images: torch.Tensor | None = None  # uint8 [B, S, S, 3] at `self._size`
        self._paths: list[str] = []
        self._size = 0

    def set_images(self, images: torch.Tensor, paths: Sequence[str]) -> None:
        self._images, self._paths, self._size, self._new = images, list(paths), int(images.shape[1]), {}

    def has(self, branch: str) -> bool:
        return branch in self.info

    def _extract(self, branch: str) -> dict[str, torch.Tensor]:
        if branch not in self._new:
            if branch not in self.backbones:
                raise DataError(f"the bundle has no {branch} backbone")
            bb = self.backbones[branch]
            if "tiling" in self.info[branch]:
                self._new[branch] = self._extract_tiles(branch)
                return self._new[branch]
            images = self._images
            if bb.image_size != self._size:  # decoded at another branch's size: decode again, as the features stage
                images = load_batch(self._paths, bb.image_size)
            self._new[branch] = encode_batch(bb, images, self.dtype)
        return self._new[branch]

    def _extract_tiles(self, branch: str) -> dict[str, torch.Tensor]:
        """The new images' tile features {"level_j": [B, T, C, h, w]}, re-read from their files at the tiling
        resolution; an image tiled at another size than the shots is a DataError naming it."""
        from anomaly_core.config import build
        from anomaly_core.kit.tiling import TilingConfig, extract_tile_features

        tiling = build(TilingConfig, self.info[branch]["tiling"], "model.json features_info tiling")
        if not all(self._paths):
            raise DataError(f"a bundle of tiled {branch} features reads its images from their files (give paths)")
        _, hw = self._shot_tiles[branch]
        out: dict[str, list[torch.Tensor]] = {}
        for path in self._paths:  # one image at a time: its tiles are the batch, as in the features stage
            feats, _, got = extract_tile_features(self.backbones[branch], [path], tiling, self._tile_batch, self.dtype,
                                                  max_pixels=2**62)  # predict checked --max-pixels
            if got != hw:
                raise DataError(f"{path}: {got[0]}x{got[1]} px at tiling resolution {tiling.resolution}, the "
                                f"bundle's category {self._category} was tiled at {hw[0]}x{hw[1]} px")
            for k, v in feats.items():
                out.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in out.items()}

    def tiles(self, branch: str, rows) -> tuple[torch.Tensor, tuple[int, int]]:
        """(tile offsets [T, 2], tiled (H, W)) as `FeatureStore.tiles`: the shots' (new images of another size are
        refused when extracted)."""
        if branch not in self._shot_tiles:
            raise DataError(f"the bundle's {branch} features are not tiled")
        if any(r.id.startswith(NEW) for r in rows):
            self._extract(branch)
        return self._shot_tiles[branch]

    def get(self, branch: str, rows) -> dict[str, torch.Tensor]:
        """Features of rows (shots or new images) in the rows' order, as float32 (as `FeatureStore.get`)."""
        if not rows:
            raise DataError("no rows requested")
        parts: dict[str, list[torch.Tensor]] = {}
        for row in rows:
            if row.id.startswith(NEW):
                src, i = self._extract(branch), int(row.id[len(NEW):])
            elif row.id in self._shot_index and branch in self._shots:
                src, i = self._shots[branch], self._shot_index[row.id]
            else:
                raise DataError(f"{row.id}: not in the bundle's {branch} features")
            for k, v in src.items():
                parts.setdefault(k, []).append(v[i])
        return {k: torch.stack(v).float() for k, v in parts.items()}

    def levels(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return level_list(feats)


class Predictor:
    """The engine of a `method` bundle: the method's own `score` on the new images (see the module docstring)."""

    def __init__(self, bundle: str | Path, card: dict | None = None):
        self.bundle = Path(bundle)
        self.card = card or read_card(self.bundle)
        if self.card["kind"] != KIND:
            raise DataError(f"{self.bundle}: kind {self.card['kind']!r}, this engine scores method bundles")
        self.method = get_method(self.card["method"])
        self.params = self.card["score_params"]
        self.backbones = {b: load_backbone(self.bundle, e) for b, e in self.card["backbone"].items()}
        first = next(iter(self.card["backbone"].values()))
        self.image_size = int(first["image_size"])  # decoding size (other branches re-decode at theirs)
        self.size = int(self.card["image_size"])
        self.dtype = getattr(torch, self.card["features_dtype"])
        self.transductive = bool(self.card.get("transductive", False))
        self._category: str | None = None
        self._states: dict = {}
        self._store: BatchStore | None = None
        self._ctx = None

    def _prepare(self, category: str) -> None:
        """The store (with this category's shots) and the fitted state of `category`, loaded once per category."""
        if self._category == category:
            return
        require_category(self.card, category)
        shots, ids, tiles = {}, [], {}
        for branch in self.card["backbone"]:
            path = self.bundle / "shots" / branch / f"{category}.safetensors"
            if path.is_file():
                shots[branch], meta = load_tensors(path)
                ids = list(meta["ids"])
                if "tiles" in meta:
                    tiles[branch] = (torch.tensor(meta["tiles"], dtype=torch.long), tuple(meta["tiled_hw"]))
        self._store = BatchStore(self.card["features_info"], self.backbones, self.dtype, shots, ids, tiles,
                                 int(self.card.get("tile_batch", 16)), category)
        self._shot_rows = [Row(i, category, "train", 0, "", "", "", 1) for i in ids]
        ctx = context_for(self.method, self.params, [], self._store, self.bundle / "model")
        ctx._clip = self.backbones.get("clip")  # the bundle's CLIP weights, never a rebuild from the config
        self._ctx = ctx
        self._states = ({category: self.method.load(states_path(self.bundle / "model", category), ctx)}
                        if self.method.fit is not None else {})
        self._category = category

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, category: str, paths: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, S, S, 3] decoded from `paths` -> (image scores [B], maps [B, size, size])."""
        self._prepare(category)
        paths = [str(p) for p in (paths if paths is not None else [""] * len(images))]
        if self.transductive and len(images) < 2:
            raise DataError(f"{self.card['method']} is transductive: it scores a pool of at least 2 images of a "
                            f"category against each other, got {len(images)}")
        self._store.set_images(images, paths)
        new = [Row(f"{NEW}{n}", category, "test", 0, "", p, "", 0) for n, p in enumerate(paths)]
        self._ctx.rows = self._shot_rows + new
        _, image, maps = self.method.score(self._ctx, self._states)["test"][category]
        return image.float(), maps.float()


