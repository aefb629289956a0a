"""Which rows a few-shot method may train on and which it selects its checkpoint on (never test).

Methods that use defect images take them from the `val` split only; a seeded share of those val anomalies
(with the val normals) is held out for early stopping / checkpoint selection, and the fusion chooses its
alpha on the held-out rows only, which no method trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from anomaly_core.data.manifest import Row, rows_for, stable_rng
from anomaly_core.errors import DataError


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


def selection_rows(rows: Sequence[Row], seed: int, holdouts: float | Mapping[str, float]) -> list[Row]:
    """The val rows no method trained on, every category: what each choice made after training uses (fusion
    alpha and CLIP method, `export.method: best`, thresholds).

    ``holdouts``: {method: holdout_fraction} of the selected methods that train on val anomalies (or the smallest
    such fraction). Empty / 0 = no selected method trains on val rows: the whole val split. Otherwise the val
    normals (no method trains on them) plus the val anomalies that no method's split trains on (the permutation is
    shared by every method, so these are the smallest fraction's holdout). A category where those rows lack a
    class stops the run: a choice there would be made on rows a method trained on, or on nothing (DataError
    naming the category and params).
    """
    fractions = holdouts if isinstance(holdouts, Mapping) else ({"selected methods": holdouts} if holdouts else {})
    fractions = {m: float(f) for m, f in fractions.items()}
    out = []
    for cat in sorted({r.category for r in rows}):
        val = rows_for(rows, cat, "val")
        # what any method may have trained on: its split's training anomalies (min_normals=2, the strictest any
        # method asks, so a method without a holdout counts as having trained on every val anomaly)
        trained = {r.id for m, f in fractions.items()
                   for r in split_holdout(rows, cat, seed, m, f, min_normals=2).train_anomalous}
        held = ([r for r in val if r.label == 0] + [r for r in val if r.label == 1 and r.id not in trained]
                if fractions else val)
        n_norm, n_anom = sum(r.label == 0 for r in held), sum(r.label == 1 for r in held)
        if not n_norm or not n_anom:
            n_val_anom = sum(r.label == 1 for r in val)
            why = (f"its val split has {len(val) - n_val_anom} normal and {n_val_anom} anomalous images"
                   + (f" and {', '.join(sorted(fractions))} train on val anomalies (a holdout needs >= 2 of them, "
                      "one kept out)" if fractions else ""))
            fix = "raise data.val_fraction" + (" or deselect those methods in `methods`" if fractions else "")
            raise DataError(f"category {cat}: no val rows left to choose on (fusion alpha, export, thresholds) that "
                            f"no method trained on: {why}; {fix}")
        out += held
    return out


def selection_summary(rows: Sequence[Row]) -> dict[str, dict[str, int]]:
    """{category: {"normal": n, "anomalous": n}} of selection rows (for the metrics' `_protocol`)."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        c = out.setdefault(r.category, {"normal": 0, "anomalous": 0})
        c["anomalous" if r.label == 1 else "normal"] += 1
    return out


def selection_protocol(rows: Sequence[Row], seed: int, holdouts: Mapping[str, float]) -> dict:
    """The `_protocol.selection` entry of the metrics files: which rows each choice used.

    ``holdouts``: {method: holdout_fraction} of the selected methods that train on val anomalies. A category
    where no selection is possible is reported under ``error`` (the stages that choose stop on it)."""
    fractions = {m: float(f) for m, f in holdouts.items()}
    rows_note = (f"val normals + the val anomalies held out at holdout_fraction={min(fractions.values())} "
                 f"(held out by every method that trains on val anomalies: {', '.join(sorted(fractions))})"
                 if fractions else "the whole val split (no selected method trains on val rows)")
    out: dict = {"fusion_alpha_and_clip_method": rows_note, "export_method_best": rows_note, "thresholds": rows_note}
    try:
        out["rows_per_category"] = selection_summary(selection_rows(rows, seed, fractions))
    except DataError as exc:
        out["error"] = str(exc)
    checkpoints = {}
    for m, f in sorted(fractions.items()):
        per_cat = {}
        for cat in sorted({r.category for r in rows}):
            split = split_holdout(rows, cat, seed, m, f)
            per_cat[cat] = (f"holdout: {len(split.holdout_normal)} normal + {len(split.holdout_anomalous)} anomalous"
                            if split.has_holdout else "no holdout (< 2 val anomalies): training criterion")
        checkpoints[m] = per_cat
    out["checkpoints"] = checkpoints
    return out
