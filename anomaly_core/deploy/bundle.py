"""The exported model bundle (`models/export/`): everything needed to score one image with no DVC repo, no
dataset and no network. This module holds what every bundle shares: the card (`model.json`) and its format, the
backbone weights, the inputs a bundle writer gets (`BundleInputs`) and the training-data hash. It imports no method.

What a bundle holds beyond that is the method's business (deploy asks the method, never branches on its name):

* a method with its own deploy module (`Method.deploy`, e.g. `methods/knn/deploy.py`, kind `knn`: memory banks);
* any other method: the generic bundle (`deploy/generic.py`, kind `method`: its score params, fitted states and
  the shots' features its score reads; predict runs the method's own `score`);
* `fusion` (`deploy/export.py`, kind `fusion`): a bundle of each branch's method in `clip/` and `visual/` plus
  alpha and the per-category val standardisation statistics.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from anomaly_core.data.manifest import Row
from anomaly_core.errors import DataError
from anomaly_core.io import load_tensors, read_json, save_tensors

__all__ = ["FORMAT", "BundleInputs", "data_hash", "save_backbone", "load_backbone", "read_card", "require_category",
           "confine_card"]

FORMAT = 1


@dataclass
class BundleInputs:
    """What a bundle writer reads: the manifest rows, the cached features, the method's model directory
    (data/models/<method>: fitted states, training-stage outputs) and the export stage's resolved config."""

    rows: Sequence[Row]
    features: Path
    models: Path                # data/models/<method>
    params: dict[str, Any]      # the export stage's config (`score`: every method's score-stage params)
    method: str

    @property
    def size(self) -> int:      # data.image_size: map resolution
        return int(self.params["data"]["image_size"])

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    @property
    def dtype(self) -> str:     # features.dtype: the cache's dtype, which predict reproduces
        return self.params["features"]["dtype"]


def data_hash(rows: Sequence[Row]) -> str:
    """sha256 over the training shots (id and file bytes, id order): which images the bank / training saw."""
    h = hashlib.sha256()
    for r in sorted((r for r in rows if r.split == "train" and r.shot), key=lambda r: r.id):
        h.update(r.id.encode() + b"\0" + hashlib.sha256(Path(r.image).read_bytes()).digest())
    return h.hexdigest()


def save_backbone(out: Path, branch: str, raw: dict) -> dict:
    """Build the backbone of a `backbones.<branch>` section, store its weights; the card's backbone entry."""
    from anomaly_core.backbones import backbone_from_config

    cfg, bb = backbone_from_config(raw, f"backbones.{branch}")
    save_tensors(out / f"backbone_{branch}.safetensors", {k: v.detach().contiguous() for k, v in bb.state_dict().items()})
    return {"name": cfg.name, "pretrained": cfg.pretrained, "levels": list(cfg.levels), "image_size": cfg.image_size,
            "weights": f"backbone_{branch}.safetensors", "mean": list(bb.mean), "std": list(bb.std),
            "grid": getattr(bb, "grid", None)}


def load_backbone(bundle: Path, entry: dict):
    """The frozen backbone of a card's backbone `entry`: built untrained from its name (no download), then the
    bundle's weights loaded strictly."""
    import logging

    from anomaly_core.backbones import create_backbone

    logging.disable(logging.WARNING)  # open_clip's "No pretrained weights loaded": the bundle's weights come next
    try:
        bb = create_backbone(entry["name"], "random", entry["levels"], entry["image_size"])
    finally:
        logging.disable(logging.NOTSET)
    state, _ = load_tensors(Path(bundle) / entry["weights"])
    bb.load_state_dict(state, strict=True)
    bb.mean, bb.std = tuple(entry["mean"]), tuple(entry["std"])
    bb.pretrained = entry["pretrained"]
    return bb.eval()


def read_card(bundle: Path) -> dict:
    """The bundle's model.json; DataError naming the directory when it is not an exported bundle."""
    path = Path(bundle) / "model.json"
    if not path.is_file():
        raise DataError(f"{bundle}: not a model bundle (no model.json; `dvc repro export` writes models/export)")
    card = read_json(path)
    if card.get("format") != FORMAT:
        raise DataError(f"{path}: bundle format {card.get('format')}, this version reads {FORMAT}; re-export it")
    if not card.get("exported"):
        raise DataError(f"{path}: method {card.get('method')} was not exported: {card.get('reason')}")
    confine_card(Path(bundle), card, path)
    return card


def _inside(bundle: Path, rel: Any) -> bool:
    """True when the relative path `rel` names something inside `bundle` (no absolute path, no `..` way out)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return False
    root = bundle.resolve()
    target = (bundle / rel).resolve()
    return target == root or root in target.parents


def confine_card(bundle: Path, card: dict, path: Path) -> None:
    """A card's file names stay inside its bundle: category names are plain names (they become file names),
    backbone `weights` and fusion member `dir` resolve inside the folder. A crafted card is refused in one line."""
    for cat in card.get("categories", []):
        if not isinstance(cat, str) or not cat or cat.startswith(".") or any(c in cat for c in "/\\\0"):
            raise DataError(f"{path}: category name {cat!r} is not a plain file name; refusing the bundle")
    for branch, entry in (card.get("backbone") or {}).items():
        if not _inside(bundle, (entry or {}).get("weights")):
            raise DataError(f"{path}: backbone.{branch}.weights={(entry or {}).get('weights')!r} is outside the "
                            "bundle folder; refusing the bundle")
    for branch, member in (card.get("members") or {}).items():
        if not _inside(bundle, (member or {}).get("dir")) or (bundle / member["dir"]).resolve() == bundle.resolve():
            raise DataError(f"{path}: members.{branch}.dir={(member or {}).get('dir')!r} is outside the bundle "
                            "folder; refusing the bundle")


def require_category(card: dict, category: str) -> None:
    """A DataError listing the bundle's categories when `category` is not one of them."""
    if category not in card["categories"]:
        raise DataError(f"category {category!r} is not in the bundle (has {', '.join(card['categories'])})")
