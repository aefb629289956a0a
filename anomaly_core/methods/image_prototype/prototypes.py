"""CLIP image prototypes: centroids of normalised CLIP embeddings of the k shots (no training).

* classification: one centroid per class from the k-shot global embeddings; `classify` is a cosine /
  temperature softmax over the centroids (the "prototype kNN" baseline, temperature 0.01);
* anomaly detection (method `image_prototypes`): the image score is `1 - cos(global, normal centroid)`;
  the map is `1 - cos(patch token, level centroid)` with one centroid of the k-shot normal patch tokens per
  CLIP level (position-agnostic), averaged over levels, upsampled and smoothed like every other map.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from anomaly_core.config import Checks
from anomaly_core.data.holdout import shot_rows
from anomaly_core.data.manifest import Row, categories
from anomaly_core.errors import DataError, WeightsError
from anomaly_core.io import load_checkpoint, save_checkpoint
from anomaly_core.kit.maps import to_image_maps
from anomaly_core.kit.patches import clip_grid
from anomaly_core.kit.prototypes import centroid, class_centroids, classify
from anomaly_core.kit.scores import Scores, score_splits
from anomaly_core.store import FeatureStore

__all__ = ["ImageProtoConfig", "normal_centroid_score",
           "fit_image_prototypes", "score_image_prototypes", "fit_class_prototypes", "classify_rows",
           "save_image_prototypes", "load_image_prototypes", "KIND"]

KIND = "image_prototypes"


@dataclass
class ImageProtoConfig:
    sigma: float = 4.0          # Gaussian smoothing of the patch maps (pixels)
    temperature: float = 0.01   # softmax temperature of `classify`

    def validate(self, section: str) -> None:
        Checks(section).non_negative(sigma=self.sigma).positive(temperature=self.temperature).done()


def normal_centroid_score(emb: torch.Tensor, normal_centroid: torch.Tensor) -> torch.Tensor:
    """emb [..., E], centroid [E] -> anomaly score [...] = 1 - cos (0 on the centroid, up to 2)."""
    return 1.0 - F.normalize(emb.float(), dim=-1) @ F.normalize(normal_centroid.float(), dim=-1)


# ---------------------------------------------------------------------------- anomaly detection


def fit_image_prototypes(store: FeatureStore, rows: Sequence[Row]) -> dict[str, dict[str, torch.Tensor]]:
    """{category: {"global": [E] centroid of the shots' global embeddings,
                   "patch": [n_levels, E] per-level centroid of the shots' patch tokens}}."""
    out = {}
    for cat in categories(rows):
        feats = store.get("clip", shot_rows(rows, cat))
        levels = store.levels(feats)  # [N, L, E] each
        out[cat] = {"global": centroid(feats["global"]),
                    "patch": torch.stack([centroid(l.reshape(-1, l.shape[-1])) for l in levels])}
    return out


def score_image_prototypes(store: FeatureStore, rows: Sequence[Row], protos: dict[str, dict[str, torch.Tensor]],
                           cfg: ImageProtoConfig, size: int, progress: bool = False) -> Scores:
    """Scores {split: {category: (ids, image [N], maps [N, size, size])}} for val and test."""
    grid = clip_grid(store)

    def part(cat: str, rows_: list[Row]):
        p, feats, n = protos[cat], store.get("clip", rows_), len(rows_)
        per_level = [normal_centroid_score(l, p["patch"][j]).reshape(n, grid, grid)
                     for j, l in enumerate(store.levels(feats))]
        maps = to_image_maps(torch.stack(per_level).mean(0), size, cfg.sigma)
        return normal_centroid_score(feats["global"], p["global"]), maps

    return score_splits(rows, part)


# ---------------------------------------------------------------------------- classification


def fit_class_prototypes(store: FeatureStore, rows: Sequence[Row], category: str
                         ) -> tuple[list[str], torch.Tensor]:
    """Classification data (classes = `defect_type`): centroids of the k-shot train rows of each class.

    -> (class names sorted, centroids [C, E])."""
    shots = shot_rows(rows, category)
    if not shots:
        raise DataError(f"category {category!r}: no k-shot train rows to build class prototypes from")
    names = sorted({r.defect_type for r in shots})
    labels = torch.tensor([names.index(r.defect_type) for r in shots])
    return names, class_centroids(store.get("clip", shots)["global"], labels, len(names))


def classify_rows(store: FeatureStore, rows: Sequence[Row], names: Sequence[str], centroids: torch.Tensor,
                  temperature: float = 0.01) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """rows of one category -> (ids, probabilities [N, C], true class index [N], -1 for an unknown class)."""
    probs = classify(store.get("clip", rows)["global"], centroids, temperature)
    y = torch.tensor([names.index(r.defect_type) if r.defect_type in names else -1 for r in rows])
    return [r.id for r in rows], probs, y


# ---------------------------------------------------------------------------- checkpoints


def save_image_prototypes(path: str | Path, protos: dict[str, torch.Tensor], arch: str, **extra: Any) -> None:
    """One category's {"global": [E], "patch": [n_levels, E]} (or {"centroids": [C, E]} with
    classes=[...] in `extra`) as a checkpoint of kind "image_prototypes"."""
    save_checkpoint(path, KIND, arch, {k: v.detach().cpu() for k, v in protos.items()}, **extra)


def load_image_prototypes(path: str | Path, arch: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors saved by `save_image_prototypes`, checkpoint dict)."""
    obj = load_checkpoint(path, KIND, arch)
    if not obj["state_dict"]:
        raise WeightsError(f"{path}: empty image_prototypes checkpoint; re-run the stage")
    return obj["state_dict"], obj
