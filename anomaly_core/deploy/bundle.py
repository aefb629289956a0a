"""The exported model bundle (`models/export/`): everything needed to score one image with no DVC repo, no
dataset and no network.

Three kinds (`kind` in `model.json`), each scored by `anomaly_core.deploy.predict`:

* `knn` (method knn; the ONNX export handles it)::

    model.json                      card: method, kind, params, thresholds, val/test metrics, protocol, data hash
    backbone_<branch>.safetensors   the frozen backbone's weights (rebuilt from its name, then loaded)
    knn/<category>.safetensors      the kNN memory bank [M, D] of each category

* `method` (any other registered method): the method's own `score` runs on the new images, so a bundle scores
  exactly as the pipeline's `score` stage::

    model.json                      card + `score_params` (what the score stage reads), `features_info`
    backbone_<branch>.safetensors   the backbones of the feature branches the method reads
    model/                          data/models/<method>: fitted states (state/<category>.pt) and the outputs
                                    of its training stages (AA-CLIP: text.pt, image.pt)
    shots/<branch>/<category>.safetensors   cached features of the train shots (methods whose score builds a
                                    memory bank from them: vpt_knn), stored in `features.dtype` with their ids

* `fusion`: `clip/` and `visual/` (a bundle of each branch's method) and, in `model.json`, alpha and the
  per-category val standardisation statistics of both branches (`fusion.fusion_model`).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from anomaly_core.config import Checks, KnnConfig
from anomaly_core.data.holdout import shot_rows
from anomaly_core.data.manifest import Row, categories
from anomaly_core.errors import DataError
from anomaly_core.io import load_tensors, read_json, save_tensors, write_json

__all__ = ["ExportConfig", "FORMAT", "choose_method", "data_hash", "write_knn_bundle", "write_method_bundle",
           "write_fusion_bundle", "read_card", "load_backbone", "load_bank"]

FORMAT = 1
Metric = Literal["image_auroc", "image_ap", "pixel_auroc", "pixel_aupro", "mean"]


@dataclass
class ExportConfig:
    """params.yaml section `export`."""

    method: str = "best"            # best = the best val `metric` among the methods that ran (fusion included)
    metric: Metric = "image_auroc"  # what `best` compares on val (the rows no method trained on)

    def validate(self, section: str) -> None:
        Checks(section).that(bool(self.method.strip()), "method", self.method, "best or a method name").done()


def choose_method(candidates: dict[str, dict], truth: dict, metric: str, method: str = "best",
                  max_fpr: float = 0.3) -> tuple[str, dict[str, float]]:
    """(method, {candidate: val metric}). `candidates`: {name: val Scores {category: (ids, image, maps)}} in
    preference order (registry order, fusion last); ties go to the earlier one. `truth`: `fusion.val_truth`."""
    from anomaly_core.fusion import _reorder, val_metric

    if method != "best" and method not in candidates:
        raise DataError(f"export.method={method}: no val scores for it (have {', '.join(candidates)})")
    ids = {c: list(t[0]) for c, t in truth.items()}
    values = {m: val_metric(truth, _reorder(s, ids, m), metric, max_fpr)[0] for m, s in candidates.items()}
    if method != "best":
        return method, values
    top = max(values.values())
    return next(m for m in candidates if values[m] >= top - 1e-12), values


def data_hash(rows: Sequence[Row]) -> str:
    """sha256 over the training shots (id and file bytes, id order): which images the bank / training saw."""
    h = hashlib.sha256()
    for r in sorted((r for r in rows if r.split == "train" and r.shot), key=lambda r: r.id):
        h.update(r.id.encode() + b"\0" + hashlib.sha256(Path(r.image).read_bytes()).digest())
    return h.hexdigest()


def _save_backbone(out: Path, branch: str, raw: dict) -> dict:
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


def load_bank(bundle: Path, category: str) -> torch.Tensor:
    """The kNN memory bank [M, D] float32 of `category`."""
    return load_tensors(Path(bundle) / "knn" / f"{category}.safetensors")[0]["bank"]


def write_knn_bundle(out: Path, rows: Sequence[Row], store, cfg: KnnConfig, backbone_raw: dict, dtype: str,
                     size: int, seed: int, card: dict[str, Any]) -> dict:
    """Write a kNN bundle to `out`: the bank of every category (built exactly as `methods/knn.py` builds it from
    the cached features), the backbone weights, and `model.json` = `card` + what `predict` needs. Returns the card."""
    from anomaly_core.methods.shared import patch_grid
    from anomaly_core.scoring.knn import PatchKnn

    out = Path(out)
    banks = {}
    grids = {cat: (lambda cat=cat: patch_grid(store, cfg.branch, shot_rows(rows, cat), cfg.patch_aggregate,
                                              cfg.patch_pad)) for cat in categories(rows)}
    for cat, knn in PatchKnn.fit_each(grids, cfg, seed):
        save_tensors(out / "knn" / f"{cat}.safetensors", {"bank": knn.bank.contiguous()})  # [M, D] float32
        banks[cat] = list(knn.bank.shape)
    backbone = _save_backbone(out, cfg.branch, backbone_raw)
    card = {**card, "format": FORMAT, "exported": True, "kind": "knn", "image_size": size,
            "features_dtype": dtype, "knn": asdict(cfg), "backbone": {cfg.branch: backbone},
            "banks": banks, "categories": sorted(banks)}
    write_json(out / "model.json", card)
    return card


def write_method_bundle(out: Path, method: str, rows: Sequence[Row], features: Path, models: Path,
                        score_params: dict, backbones_raw: dict, dtype: str, size: int, card: dict[str, Any]) -> dict:
    """Write a `method` bundle to `out` (layout in the module docstring): what `method`'s score stage reads,
    copied (its params subset, fitted states, training-stage outputs), the backbones of its feature branches and,
    when its score reads them, the shots' cached features. Returns the card."""
    import shutil

    from anomaly_core.methods import get_method
    from anomaly_core.store import FeatureStore

    out, m = Path(out), get_method(method)
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
                save_tensors(out / "shots" / b / f"{cat}.safetensors",
                             {k: v.to(getattr(torch, dtype)).contiguous() for k, v in feats.items()},
                             {"ids": [r.id for r in part]})
                shots[cat] = len(part)
    card = {**card, "format": FORMAT, "exported": True, "kind": "method", "method": method, "image_size": size,
            "features_dtype": dtype, "score_params": score_params, "transductive": m.transductive,
            "features_info": {b: store.info[b] for b in branches},
            "backbone": {b: _save_backbone(out, b, backbones_raw[b]) for b in branches},
            "shots": shots, "categories": categories(rows)}
    write_json(out / "model.json", card)
    return card


def write_fusion_bundle(out: Path, fusion: dict, members: dict[str, Any], card: dict[str, Any]) -> dict:
    """Write a `fusion` bundle: `members` {"clip": writer, "visual": writer}, each a function(dir) that writes that
    branch's bundle; `fusion`: `fusion.fusion_model` (alpha, standardisation statistics). Returns the card."""
    out = Path(out)
    for branch in ("clip", "visual"):
        members[branch](out / branch)
    sub = {b: read_json(out / b / "model.json") for b in ("clip", "visual")}
    cats = sorted(set(sub["clip"]["categories"]) & set(sub["visual"]["categories"]))
    absent = [c for c in cats if c not in fusion["stats"]["clip"] or c not in fusion["stats"]["visual"]]
    if absent:
        raise DataError(f"fusion model: no standardisation statistics for category {absent[0]}; re-run `dvc repro fuse`")
    card = {**card, "format": FORMAT, "exported": True, "kind": "fusion", "image_size": sub["clip"]["image_size"],
            "fusion": fusion, "members": {b: {"method": sub[b]["method"], "kind": sub[b]["kind"], "dir": b}
                                          for b in ("clip", "visual")},
            "transductive": any(s.get("transductive", False) for s in sub.values()), "categories": cats}
    write_json(out / "model.json", card)
    return card


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
    return card
