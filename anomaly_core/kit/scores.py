"""The per-category / per-split loop every method's score runs, the `Scores` it returns, and per-method seeds."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from anomaly_core.data.manifest import Row, categories, rows_for, stable_rng

Scores = dict[str, dict[str, tuple[list[str], torch.Tensor, torch.Tensor]]]  # {split: {category: (ids, image [N], maps [N, S, S])}}
EVAL_SPLITS = ("val", "test")

__all__ = ["Scores", "EVAL_SPLITS", "score_splits", "category_seed"]


def score_splits(rows: Sequence[Row], score_part: Callable[[str, list[Row]], tuple[torch.Tensor, torch.Tensor]],
                 prepare: Callable[[str], object] | None = None) -> Scores:
    """The loop every method runs: for each category (after `prepare(category)`, e.g. building a memory bank)
    and each evaluation split with rows, `score_part(category, rows) -> (image [N], maps [N, S, S])`."""
    out: Scores = {s: {} for s in EVAL_SPLITS}
    for cat in categories(rows):
        if prepare is not None:
            prepare(cat)
        for split in EVAL_SPLITS:
            part = rows_for(rows, cat, split)
            if part:
                image, maps = score_part(cat, part)
                out[split][cat] = ([r.id for r in part], image, maps)
    return out


def category_seed(seed: int, method: str, category: str) -> int:
    """A per-(method, category) torch seed that does not depend on which other categories exist."""
    return int(stable_rng(seed, f"{method}/{category}").integers(2**31 - 1))
