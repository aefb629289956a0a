"""Which rows a few-shot method may train on and which it selects its checkpoint on (never test).

Methods that use defect images take them from the `val` split only; a seeded share of those val anomalies
(with the val normals) is held out for early stopping / checkpoint selection, and the fusion chooses its
alpha on the held-out rows only, which no method trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from anomaly_core.data.manifest import Row, rows_for, stable_rng


def shot_rows(rows: Sequence[Row], category: str) -> list[Row]:
    """The seeded k-shot normal training rows of a category."""
    return [r for r in rows_for(rows, category, "train") if r.shot]


def val_anomalies(rows: Sequence[Row], category: str) -> list[Row]:
    """The anomalous `val` rows of a category (the only defect images training may use)."""
    return [r for r in rows_for(rows, category, "val") if r.label == 1]


@dataclass
class HoldoutSplit:
    """Rows of one category for training and for model selection (never test rows)."""

    train_normal: list[Row]       # k-shot normals used for training
    train_anomalous: list[Row]    # val anomalies used for training
    holdout_normal: list[Row]     # val normals (or, without any, a share of the shots)
    holdout_anomalous: list[Row]  # val anomalies kept out of training

    @property
    def has_holdout(self) -> bool:
        return bool(self.holdout_normal) and bool(self.holdout_anomalous)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.__dict__.items()}


def split_holdout(rows: Sequence[Row], category: str, seed: int, method: str, fraction: float = 0.25,
                  use_anomalies: bool = True, min_normals: int = 1) -> HoldoutSplit:
    """Seeded model-selection split of one category, from train shots and val rows only.

    With >= 2 val anomalies, round(fraction * n) of them (at least 1, at most n - 1) are held out and the
    val normals are the held-out normals; without val normals, the same share of the k shots is held out
    (when >= min_normals + 1 shots). Without enough of either there is no holdout: every shot and val anomaly
    is training data and the caller falls back to a training criterion.
    """
    shots = shot_rows(rows, category)
    anomalous = val_anomalies(rows, category) if use_anomalies else []
    no_holdout = HoldoutSplit(shots, anomalous, [], [])
    if len(anomalous) < 2 or fraction <= 0:
        return no_holdout
    # One permutation per (seed, category) for every method: with equal fractions all methods hold out the same
    # val anomalies, and the smallest fraction's holdout is unseen by every method (the fusion selects on it).
    rng = stable_rng(seed, f"holdout/{category}")
    n_hold = min(max(1, round(fraction * len(anomalous))), len(anomalous) - 1)
    held = set(rng.permutation(len(anomalous))[:n_hold].tolist())
    hold_a = [r for i, r in enumerate(anomalous) if i in held]
    train_a = [r for i, r in enumerate(anomalous) if i not in held]
    hold_n = [r for r in rows_for(rows, category, "val") if r.label == 0]
    train_n = shots
    if len(hold_n) < min_normals and len(shots) >= min_normals + 1:
        n_shot = min(max(min_normals, round(fraction * len(shots))), len(shots) - 1)
        picked = set(rng.permutation(len(shots))[:n_shot].tolist())
        hold_n = [r for i, r in enumerate(shots) if i in picked]
        train_n = [r for i, r in enumerate(shots) if i not in picked]
    if len(hold_n) < min_normals:
        return no_holdout
    return HoldoutSplit(train_n, train_a, hold_n, hold_a)


def selection_rows(rows: Sequence[Row], seed: int, fraction: float) -> list[Row]:
    """The val rows no method trained on (val normals + held-out val anomalies, every category), for choices
    made after training (fusion alpha). Falls back to the whole val split for a category without a holdout."""
    out = []
    for cat in sorted({r.category for r in rows}):
        split = split_holdout(rows, cat, seed, "selection", fraction)
        held = (split.holdout_normal + split.holdout_anomalous) if split.has_holdout else []
        out += [r for r in held if r.split == "val"] or rows_for(rows, cat, "val")
    return out
