"""Training sets for the two AA-CLIP stages, from the manifest (val anomalies only) or a second dataset.

Target-dataset protocol: each category trains on its k-shot normals plus the val anomalies left after
`split_holdout`; the held-out val images choose the stage-2 checkpoint. Cross-dataset protocol (the paper's):
every image of a second dataset trains the adapters, and the target's val split chooses the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, Union

import torch

from anomaly_core.config import Checks, build
from anomaly_core.data.holdout import split_holdout
from anomaly_core.data.manifest import Row, categories
from anomaly_core.evaluation import masks_for
from anomaly_core.features import extract_features, load_batch
from anomaly_core.methods.aaclip.core import SCORING
from anomaly_core.store import FeatureStore, level_list


@dataclass
class TrainDataConfig:
    """`aaclip.train_data`: a second dataset to train AA-CLIP on (cross-dataset protocol); format "" = none."""
    format: Literal["", "mvtec", "visa"] = ""
    root: str = ""
    categories: Union[str, list[str]] = "all"

    def validate(self, section: str) -> None:
        c = Checks(section)
        if isinstance(self.categories, str):
            c.that(self.categories == "all", "categories", self.categories, "a list of names or 'all'")
        c.that(not self.format or bool(self.root), "root", self.root, f"a directory (format={self.format!r})")
        c.done()


@dataclass
class AaclipConfig:
    """params.yaml section `aaclip` (what both AA-CLIP stages share)."""
    holdout_fraction: float = 0.25
    train_data: TrainDataConfig = field(default_factory=TrainDataConfig)
    scoring: str = "softmax"   # softmax | official (test.py's min-max normalised scores; core.SCORING)

    def validate(self, section: str) -> None:
        Checks(section).fraction(holdout_fraction=self.holdout_fraction) \
            .that(self.scoring in SCORING, "scoring", self.scoring, f"one of {list(SCORING)}").done()

ImageSet = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def training_rows(rows: Sequence[Row], seed: int, holdout_fraction: float) -> tuple[list[Row], list[Row]]:
    """(training rows, selection rows) over all categories; never a test row."""
    train, select = [], []
    for cat in categories(rows):
        split = split_holdout(rows, cat, seed, "aaclip", holdout_fraction)
        train += split.train_normal + split.train_anomalous
        select += split.holdout_normal + split.holdout_anomalous
    return train, select


def load_images(rows: Sequence[Row], size: int) -> torch.Tensor:
    """uint8 [N, size, size, 3]."""
    return load_batch([r.image for r in rows], size)


def image_set(rows: Sequence[Row], image_size: int, mask_size: int) -> ImageSet:
    """(images uint8 [N, S_img, S_img, 3], masks [N, S_mask, S_mask] 0/1, labels [N], class names)."""
    masks = torch.from_numpy(masks_for(rows, mask_size)).float()
    labels = torch.tensor([r.label for r in rows])
    return load_images(rows, image_size), masks, labels, [r.category for r in rows]


def text_stage_data(rows: Sequence[Row], mask_size: int, store: FeatureStore | None = None,
                    backbone=None, progress: bool = False, image_size: int | None = None) -> list[dict[str, Any]]:
    """One dict per category for `train_text_adapters`: cached CLIP tokens (from `store`), or tokens computed
    with the frozen `backbone` for rows that have no cache (a second dataset); with `image_size` also the images
    (uint8 [N, image_size, image_size, 3], for `aaclip_text.dpam`)."""
    out = []
    for cat in categories(rows):
        part = [r for r in rows if r.category == cat]
        if store is not None:
            feats = store.get("clip", part)
        else:
            feats = {k: v.float() for k, v in extract_features(backbone, [r.image for r in part], 16,
                                                                torch.float16, f"clip/{cat}", progress).items()}
        out.append({"levels": level_list(feats), "global": feats["global"],
                    "masks": torch.from_numpy(masks_for(part, mask_size)).float(), "class_name": cat})
        if image_size:
            out[-1]["images"] = load_images(part, image_size)
    return out


def second_dataset_rows(raw: dict) -> list[Row]:
    """Rows of the second dataset named by `aaclip.train_data` (cross-dataset protocol), or [] when its format is
    empty."""
    from pathlib import Path

    from anomaly_core.data import readers
    from anomaly_core.errors import ConfigError

    cfg = build(TrainDataConfig, raw, "aaclip.train_data")
    if not cfg.format:
        return []
    if not Path(cfg.root).is_dir():
        raise ConfigError(f"aaclip.train_data.root={cfg.root}: directory not found")
    rows = readers.READERS[cfg.format](Path(cfg.root), cfg.categories)
    readers.validate_rows(rows)
    return rows
