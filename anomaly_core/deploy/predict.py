"""Score new images with an exported bundle (`anomaly-core predict`).

The feature path is the pipeline's, step for step: `features.load_resized` (PIL bicubic to the backbone size),
`backbones.preprocess`, the frozen backbone, the cast to `features.dtype` and back (the pipeline caches features
in that dtype); then the engine of the bundle's method (`deploy/engines.py`: the method's own deploy module, the
generic bundle's `score`, or the fusion), so a bundle reproduces the pipeline's test scores of the same images.
`--engine onnx` runs the method's exported ONNX graphs instead (`deploy/onnx.py`).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from anomaly_core.data.images import is_image_file
from anomaly_core.deploy.batching import prefetched_batches
from anomaly_core.deploy.bundle import read_card
from anomaly_core.deploy.engines import load_predictor
from anomaly_core.errors import DataError

__all__ = ["load_predictor", "expand_inputs", "resolve_category", "predict_files", "CSV_COLUMNS"]

CSV_COLUMNS = ("path", "category", "score", "is_anomalous", "threshold", "error")


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
        model = load_predictor(bundle, card)
    else:
        raise DataError(f"--engine {engine}: torch or onnx")
    threshold = float(card["thresholds"][cat]["image"]) if card.get("thresholds", {}).get(cat) else float("nan")
    lo, hi = card.get("map_range", {}).get(cat, (None, None))
    paths = expand_inputs(inputs)
    if model.transductive:  # one unlabeled pool: every input of the category is scored against the others
        batch_size = len(paths)
    rows: list[dict] = []
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    for start, chunk, images, errors in prefetched_batches(paths, model.image_size, batch_size):
        ok = [i for i, im in enumerate(images) if im is not None]
        scores, maps = (model(torch.from_numpy(np.stack([images[i] for i in ok])), cat, [chunk[i] for i in ok])
                        if ok else (None, None))
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
