"""Score new images with an exported bundle (`anomaly-core predict`).

The feature path is the pipeline's, step for step: `features.load_resized` (PIL bicubic to the backbone size),
`backbones.preprocess`, the frozen backbone, the cast to `features.dtype` and back (the pipeline caches features
in that dtype), `methods.shared.patch_grid`'s patch descriptors, then `PatchKnn.predict` against the bank.
So a bundle reproduces the pipeline's test scores of the same images.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from anomaly_core.config import KnnConfig, build
from anomaly_core.data.images import is_image_file
from anomaly_core.deploy.bundle import load_backbone, load_bank, read_card
from anomaly_core.errors import DataError

__all__ = ["KnnPredictor", "expand_inputs", "resolve_category", "predict_files", "CSV_COLUMNS"]

CSV_COLUMNS = ("path", "category", "score", "is_anomalous", "threshold", "error")


class KnnPredictor:
    """The PyTorch engine of a kNN bundle: uint8 images [B, S, S, 3] -> (image scores [B], maps [B, size, size])."""

    def __init__(self, bundle: str | Path, card: dict | None = None):
        self.bundle = Path(bundle)
        self.card = card or read_card(self.bundle)
        if self.card["kind"] != "knn":
            raise DataError(f"{self.bundle}: kind {self.card['kind']!r}, this engine scores kNN bundles")
        self.cfg = build(KnnConfig, self.card["knn"], "model.json knn")
        self.branch, entry = next(iter(self.card["backbone"].items()))
        self.grid_side = entry.get("grid")
        self.backbone = load_backbone(self.bundle, entry)
        self.image_size = int(entry["image_size"])  # the backbone's input size
        self.size = int(self.card["image_size"])    # map resolution (data.image_size)
        self.dtype = getattr(torch, self.card["features_dtype"])
        self._banks: dict[str, torch.Tensor] = {}

    def bank(self, category: str) -> torch.Tensor:
        if category not in self._banks:
            if category not in self.card["categories"]:
                raise DataError(f"category {category!r} is not in the bundle (has {', '.join(self.card['categories'])})")
            self._banks = {category: load_bank(self.bundle, category)}  # one category's bank in memory
        return self._banks[category]

    @torch.no_grad()
    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> patch descriptors [B, h, w, D], exactly as the pipeline computes them."""
        from anomaly_core.backbones import preprocess
        from anomaly_core.scoring.knn import clip_patches, cnn_patches

        bb = self.backbone
        feats = bb(preprocess(images, bb.image_size, bb.mean, bb.std))
        levels = [lvl.to(self.dtype).float() for lvl in feats["levels"]]  # the feature cache round-trip
        if self.branch == "clip":
            return clip_patches(levels, self.grid_side)
        return cnn_patches(levels, self.cfg.patch_aggregate)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, category: str) -> tuple[torch.Tensor, torch.Tensor]:
        from anomaly_core.scoring.knn import PatchKnn

        return PatchKnn(self.bank(category), self.cfg).predict(self.grid(images), self.size)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix: an unreadable one is reported, not skipped) and the image files
    under given directories (recursively, sorted). A missing path is a DataError naming it."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p))
        elif item.exists():
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not out:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    return out


def resolve_category(card: dict, category: str | None) -> str:
    """`category`, or the bundle's only category; a DataError listing them when it is ambiguous or unknown."""
    cats = card["categories"]
    if category is None:
        if len(cats) != 1:
            raise DataError(f"the bundle has {len(cats)} categories ({', '.join(cats)}): pass --category")
        return cats[0]
    if category not in cats:
        raise DataError(f"--category {category}: not in the bundle (has {', '.join(cats)})")
    return category


def _load(paths: Iterable[Path], size: int) -> tuple[list[np.ndarray | None], list[str]]:
    """Decode and resize each file; a failure is its error line, never an exception."""
    from anomaly_core.features import load_resized

    images, errors = [], []
    for p in paths:
        try:
            images.append(load_resized(str(p), size)), errors.append("")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported on its own line
            images.append(None), errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return images, errors


def predict_files(bundle: str | Path, inputs: Sequence[str | Path], out: str | Path, category: str | None = None,
                  heatmaps: bool = False, batch_size: int = 16, engine: str = "torch",
                  progress: bool = True) -> list[dict]:
    """Score every image of `inputs` with the bundle; writes `out/predictions.csv` (CSV_COLUMNS; an unreadable
    file gets its error and empty score) and, with `heatmaps`, `out/heatmaps/<n>_<stem>.png`. Returns the rows."""
    from PIL import Image

    from anomaly_core.viz import map_overlay

    bundle, out = Path(bundle), Path(out)
    card = read_card(bundle)
    cat = resolve_category(card, category)
    if engine == "onnx":
        from anomaly_core.deploy.onnx import OnnxPredictor

        model = OnnxPredictor(bundle, card)
    elif engine == "torch":
        model = KnnPredictor(bundle, card)
    else:
        raise DataError(f"--engine {engine}: torch or onnx")
    threshold = float(card["thresholds"][cat]["image"]) if card.get("thresholds", {}).get(cat) else float("nan")
    lo, hi = card.get("map_range", {}).get(cat, (None, None))
    paths = expand_inputs(inputs)
    rows: list[dict] = []
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images, errors = _load(chunk, model.image_size)
        ok = [i for i, im in enumerate(images) if im is not None]
        scores, maps = (model(torch.from_numpy(np.stack([images[i] for i in ok])), cat) if ok else (None, None))
        for j, (p, err) in enumerate(zip(chunk, errors)):
            row = {"path": str(p), "category": cat, "score": "", "is_anomalous": "", "threshold": threshold,
                   "error": err}
            if not err:
                k = ok.index(j)
                s = float(scores[k])
                row.update(score=s, is_anomalous=int(s >= threshold))
                if heatmaps:
                    m = maps[k].numpy()
                    a, b = (lo, hi) if lo is not None else (float(m.min()), float(m.max()))
                    Image.fromarray(map_overlay(images[j], m, a, b)).save(
                        _heatmap_path(out, start + j, p))
            rows.append(row)
        bar.update(len(chunk))
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _heatmap_path(out: Path, n: int, path: Path) -> Path:
    d = out / "heatmaps"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{n:05d}_{path.stem}.png"
