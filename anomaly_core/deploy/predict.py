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

from tqdm.auto import tqdm

from anomaly_core.data.images import is_image_file
from anomaly_core.deploy.batching import prefetched_batches, scored_batches
from anomaly_core.deploy.bundle import read_card
from anomaly_core.deploy.engines import load_predictor
from anomaly_core.errors import DataError

__all__ = ["load_predictor", "expand_inputs", "resolve_category", "predict_files", "CSV_COLUMNS",
           "image_threshold", "pool_memory_bytes"]

CSV_COLUMNS = ("path", "category", "score", "is_anomalous", "threshold", "error")


def _walk(top: Path) -> list[Path]:
    """Every file under `top`, following symlinked directories; a loop (a link to an ancestor) is refused."""
    import os

    files: list[Path] = []
    for d, dirs, names in os.walk(top, followlinks=True):
        real = Path(d).resolve()
        for sub in dirs:
            if Path(d, sub).is_symlink() and (real == Path(d, sub).resolve()
                                              or real.is_relative_to(Path(d, sub).resolve())):
                raise DataError(f"{Path(d, sub)}: symlink loop (it points to {Path(d, sub).resolve()}, an ancestor)")
        files += [Path(d, n) for n in names if Path(d, n).is_file()]
    return files


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix: an unreadable one is reported, not skipped) and the image files
    under given directories (recursively, sorted). Symlinked sub-folders and files are followed, as the dataset
    readers do (a link back to an ancestor is a DataError naming it). A missing path is a DataError naming it."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in _walk(item) if is_image_file(p))
        elif item.exists():
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not out:
        raise DataError(f"no image files in {', '.join(map(str, inputs))}")
    return list(dict.fromkeys(out))  # a file given twice is scored once (one CSV row per path)


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


def image_threshold(card: dict, category: str) -> float:
    """The bundle's image threshold of `category`; a DataError when it is missing or not a finite number (a NaN
    threshold would report every image normal: `s >= nan` is False)."""
    import math

    entry = (card.get("thresholds") or {}).get(category) or {}
    value = entry.get("image") if isinstance(entry, dict) else None
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not math.isfinite(t):
        raise DataError(f"model.json: thresholds.{category}.image={value!r}: no finite image threshold for category "
                        f"{category}; re-export the bundle (`dvc repro export`)")
    return t


def pool_memory_bytes(card: dict, n: int) -> int:
    """A transductive (MuSc) pool's mutual-distance tensor: n x P x n float32, P = patches per image of the bundle's
    backbone (its grid, else the CNN's stride-8 grid at its input size)."""
    entry = next(iter((card.get("backbone") or {}).values()), {}) or {}
    grid = entry.get("grid") or max(1, int(entry.get("image_size", 224)) // 8)
    g = grid if isinstance(grid, (list, tuple)) else (grid, grid)
    return int(n) * int(n) * int(g[0]) * int(g[-1]) * 4


def _read_done(csv_path: Path, category: str, threshold: float) -> dict[str, dict]:
    """{path: row} of a predictions.csv being resumed. A trailing line cut by a kill is dropped (the file is
    truncated to its last complete row); a CSV of another category or threshold is refused."""
    data = csv_path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(csv_path, "r+b") as fh:
            fh.truncate(cut)
        data = data[:cut]
    lines = data.decode("utf-8").splitlines()
    if not lines:
        return {}
    reader = csv.DictReader(lines)
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        raise DataError(f"{csv_path}: not a predictions.csv (columns {reader.fieldnames}); use another --out")
    done = {}
    for row in reader:
        if row["category"] != category or float(row["threshold"]) != threshold:
            raise DataError(f"{csv_path}: written for category {row['category']} at threshold {row['threshold']}, "
                            f"not {category} at {threshold!r} (another bundle?); use another --out or drop --resume")
        done[row["path"]] = row
    return done


def _parsed(row: dict) -> dict:
    """A CSV row with the types predict returns (score float, is_anomalous int, threshold float)."""
    out = dict(row)
    out["threshold"] = float(row["threshold"])
    if row["score"] != "":
        out["score"], out["is_anomalous"] = float(row["score"]), int(row["is_anomalous"])
    return out


def predict_files(bundle: str | Path, inputs: Sequence[str | Path], out: str | Path, category: str | None = None,
                  heatmaps: bool = False, batch_size: int = 16, engine: str = "torch",
                  progress: bool = True, resume: bool = False, pool_size: int = 1000,
                  max_pixels: int = 40_000_000, workers: int = 1) -> list[dict]:
    """Score every image of `inputs` with the bundle; writes `out/predictions.csv` (CSV_COLUMNS; an unreadable
    file gets its error and empty score) and, with `heatmaps`, `out/heatmaps/<n>_<stem>.png`. Returns the rows.

    The CSV grows by one flushed row per image as it is scored (a heatmap is in place before its row). Without
    `resume`, an older CSV and heatmaps in `out` are removed first; with it, the images already in the CSV are
    skipped and the CSV ends as an uninterrupted run's (a batch holding a done image is re-scored whole, so every
    image is scored in the same batch as before). A transductive bundle's pool is refused above `pool_size` images.
    `workers` > 1 batches are scored at once at one torch thread each when the engine allows it (1: one batch at a
    time on torch's threads, the scores `serve` gives; with more, equal up to float rounding); see
    `batching.scored_batches`."""
    import os
    import shutil

    from PIL import Image

    from anomaly_core.io import atomic_path, file_mode
    from anomaly_core.viz import map_overlay

    bundle, out = Path(bundle), Path(out)
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be >= 1")
    if pool_size < 2:
        raise DataError(f"--pool-size {pool_size}: must be >= 2")
    if max_pixels < 1:
        raise DataError(f"--max-pixels {max_pixels}: must be >= 1")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be >= 1")
    card = read_card(bundle)
    cat = resolve_category(card, category)
    threshold = image_threshold(card, cat)
    paths = expand_inputs(inputs)
    if card.get("transductive") and len(paths) > pool_size:
        gb = pool_memory_bytes(card, len(paths)) / 1e9
        raise DataError(f"{card['method']} is transductive: {len(paths)} images of category {cat} are one pool, "
                        f"above --pool-size {pool_size} (its mutual distances take about {gb:.1f} GB); raise "
                        f"--pool-size or split the images into several calls")
    if engine == "onnx":
        from anomaly_core.deploy.onnx import OnnxPredictor

        model = OnnxPredictor(bundle, card)
    elif engine == "torch":
        model = load_predictor(bundle, card)
    else:
        raise DataError(f"--engine {engine}: torch or onnx")
    lo, hi = card.get("map_range", {}).get(cat, (None, None))
    if model.transductive:  # one unlabeled pool: every input of the category is scored against the others
        batch_size = len(paths)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "predictions.csv"
    done = _read_done(csv_path, cat, threshold) if resume and csv_path.is_file() else {}
    if not resume:  # never an older CSV or older heatmaps beside this run's
        csv_path.unlink(missing_ok=True)
        shutil.rmtree(out / "heatmaps", ignore_errors=True)
    for tmp in (out / "heatmaps").glob(".*.tmp"):  # a killed run's half-written heatmap
        tmp.unlink(missing_ok=True)
    fresh = not csv_path.is_file() or csv_path.stat().st_size == 0
    rows: dict[str, dict] = {p: _parsed(r) for p, r in done.items()}
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    with open(csv_path, "a", newline="", encoding="utf-8") as fh:
        os.chmod(csv_path, file_mode())
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        if fresh:
            writer.writeheader()
            fh.flush()
        skip = (lambda chunk: all(str(p) in done for p in chunk)) if done else None
        batches = prefetched_batches(paths, model.image_size, batch_size, workers=2, ahead=max(2, workers + 1),
                                     skip=skip, max_pixels=max_pixels)
        for (start, chunk, images, errors), scored in scored_batches(model, batches, cat, workers):
            if scored is None:  # every image of the batch is in the resumed CSV
                bar.update(len(chunk))
                continue
            ok, scores, maps = scored
            for j, (p, err) in enumerate(zip(chunk, errors)):
                if str(p) in done:
                    continue
                row = {"path": str(p), "category": cat, "score": "", "is_anomalous": "", "threshold": threshold,
                       "error": err}
                if not err:
                    k = ok.index(j)
                    s = float(scores[k])
                    row.update(score=s, is_anomalous=int(s >= threshold))
                    if heatmaps:
                        m = maps[k].numpy()
                        a, b = (lo, hi) if lo is not None else (float(m.min()), float(m.max()))
                        with atomic_path(_heatmap_path(out, start + j, p), ".tmp") as tmp:
                            Image.fromarray(map_overlay(images[j], m, a, b)).save(tmp, format="PNG")
                writer.writerow(row)
                fh.flush()  # the row survives a kill of this process from here on
                rows[str(p)] = row
            os.fsync(fh.fileno())
            bar.update(len(chunk))
    bar.close()
    return [rows[str(p)] for p in paths if str(p) in rows]


def _heatmap_path(out: Path, n: int, path: Path) -> Path:
    d = out / "heatmaps"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{n:05d}_{path.stem}.png"
