"""Score new images with an exported bundle (`anomaly-core predict`).

The feature path is the pipeline's, step for step: `features.load_resized` (PIL bicubic to the backbone size),
`backbones.preprocess`, the frozen backbone, the cast to `features.dtype` and back (the pipeline caches features
in that dtype). Then, by bundle kind:

* `knn`: `methods.shared.patch_grid`'s patch descriptors, `PatchKnn.predict` against the stored bank;
* `method`: the method's own `score` (the code of the `score` stage) with its stored params and fitted states,
  on a feature store that holds the new images as `test` rows (and the shots' stored features when the method
  builds a bank from them); features are extracted only for the branches the method reads;
* `fusion`: both branches' bundles, each standardised with its stored val statistics, mixed with alpha
  (`fusion.apply_fusion_model`, as the `fuse` stage).

So a bundle reproduces the pipeline's test scores of the same images. A transductive method (MuSc) scores every
image passed to one `predict` call of a category as one unlabeled pool: its scores depend on that set.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from anomaly_core.config import KnnConfig, build
from anomaly_core.data.images import is_image_file
from anomaly_core.data.manifest import Row
from anomaly_core.deploy.bundle import load_backbone, load_bank, read_card
from anomaly_core.errors import DataError

__all__ = ["KnnPredictor", "MethodPredictor", "FusionPredictor", "BatchStore", "load_predictor", "expand_inputs",
           "resolve_category", "predict_files", "CSV_COLUMNS"]

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
            require_category(self.card, category)
            self._banks = {category: load_bank(self.bundle, category)}  # one category's bank in memory
        return self._banks[category]

    @torch.no_grad()
    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> patch descriptors [B, h, w, D], exactly as the pipeline computes them."""
        from anomaly_core.features import encode_batch
        from anomaly_core.scoring.knn import clip_patches, cnn_patches
        from anomaly_core.store import level_list

        levels = [lvl.float() for lvl in level_list(encode_batch(self.backbone, images, self.dtype))]  # cache round-trip
        if self.branch == "clip":
            return clip_patches(levels, self.grid_side)
        return cnn_patches(levels, self.cfg.patch_aggregate, self.cfg.patch_pad)

    transductive = False

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, category: str, paths: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from anomaly_core.scoring.knn import PatchKnn

        return PatchKnn(self.bank(category), self.cfg).predict(self.grid(images), self.size)


NEW = "predict/"  # id prefix of the rows of the images being scored (never a manifest id: those have no "/" prefix)


class BatchStore:
    """The `FeatureStore` interface (`info`, `has`, `get`, `levels`) over the bundle's stored shot features and
    the images being scored. A branch's features of the new images are extracted on first request (the method
    reads only its branches), through the feature stage's path: backbone, cast to `dtype`, back to float32."""

    def __init__(self, info: dict, backbones: dict, dtype: torch.dtype, shots: dict[str, dict[str, torch.Tensor]],
                 shot_ids: list[str]):
        self.info, self.backbones, self.dtype = info, backbones, dtype
        self._shots = shots                      # {branch: {key: [n_shots, ...]}} in `shot_ids` order
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
        from anomaly_core.features import encode_batch, load_batch

        if branch not in self._new:
            if branch not in self.backbones:
                raise DataError(f"the bundle has no {branch} backbone")
            bb = self.backbones[branch]
            images = self._images
            if bb.image_size != self._size:  # decoded at another branch's size: decode again, as the features stage
                images = load_batch(self._paths, bb.image_size)
            self._new[branch] = encode_batch(bb, images, self.dtype)
        return self._new[branch]

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
        from anomaly_core.store import level_list

        return level_list(feats)


class MethodPredictor:
    """The engine of a `method` bundle: the method's own `score` on the new images (see the module docstring)."""

    def __init__(self, bundle: str | Path, card: dict | None = None):
        from anomaly_core.methods import get_method

        self.bundle = Path(bundle)
        self.card = card or read_card(self.bundle)
        if self.card["kind"] != "method":
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
        from anomaly_core.io import load_tensors
        from anomaly_core.methods.base import context_for, states_path

        if self._category == category:
            return
        require_category(self.card, category)
        shots, ids = {}, []
        for branch in self.card["backbone"]:
            path = self.bundle / "shots" / branch / f"{category}.safetensors"
            if path.is_file():
                shots[branch], meta = load_tensors(path)
                ids = list(meta["ids"])
        self._store = BatchStore(self.card["features_info"], self.backbones, self.dtype, shots, ids)
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

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, category: str, paths: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from anomaly_core.features import load_batch
        from anomaly_core.fusion import apply_fusion_model

        out = {}
        for branch, model in self.members.items():
            batch = images
            if model.image_size != images.shape[1]:
                batch = load_batch(paths, model.image_size)
            out[branch] = model(batch, category, paths)
        return apply_fusion_model(self.card["fusion"], category, out["clip"], out["visual"])


def load_predictor(bundle: str | Path, card: dict | None = None):
    """The PyTorch engine of a bundle, by its kind."""
    card = card or read_card(Path(bundle))
    engines = {"knn": KnnPredictor, "method": MethodPredictor, "fusion": FusionPredictor}
    if card.get("kind") not in engines:
        raise DataError(f"{bundle}: unknown bundle kind {card.get('kind')!r} (this version reads {', '.join(engines)})")
    return engines[card["kind"]](bundle, card)


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


def require_category(card: dict, category: str) -> None:
    """A DataError listing the bundle's categories when `category` is not one of them."""
    if category not in card["categories"]:
        raise DataError(f"category {category!r} is not in the bundle (has {', '.join(card['categories'])})")


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
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images, errors = _load(chunk, model.image_size)
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
