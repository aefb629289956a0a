"""The `export` stage's work: choose the method on val, choose its thresholds on val, report the test metrics at
those thresholds (`metrics/threshold.json`) and write the bundle: the chosen method's (its deploy module or the
generic bundle, `deploy/engines.deploy_module`), or the fusion's (a bundle of each branch + alpha and statistics).

Every choice is made on the val rows no method trained on (`data.holdout.selection_rows`, the rows the fusion
chooses alpha on); test rows are only measured.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from anomaly_core import evaluation as ev
from anomaly_core.config import Checks, build
from anomaly_core.data import manifest as mf
from anomaly_core.data.holdout import selection_rows
from anomaly_core.deploy.bundle import FORMAT, BundleInputs, data_hash
from anomaly_core.deploy.engines import deploy_module
from anomaly_core.deploy.thresholds import ThresholdConfig, category_thresholds, threshold_metrics
from anomaly_core.errors import DataError
from anomaly_core.fusion import val_truth
from anomaly_core.io import jsonable, read_json, replace_dir, write_json
from anomaly_core.store import load_scores

__all__ = ["ExportConfig", "choose_method", "candidate_dirs", "thresholds_for", "test_threshold_metrics",
           "export_experiment", "write_bundle", "write_fusion_bundle",
           "install_bundle", "remove_stale_temporaries"]

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
    values = {m: val_metric(truth, _reorder(s, ids, m), metric, max_fpr, what=m) for m, s in candidates.items()}
    if method != "best":
        return method, values
    top = max(values.values())
    return next(m for m in candidates if values[m] >= top - 1e-12), values




def candidate_dirs(methods: Sequence[str], scores: Path, fused: Path) -> dict[str, Path]:
    """{method: score directory} of the selected methods (registry order) and `fusion` when it ran."""
    out = {m: Path(scores) / m for m in methods}
    if (Path(fused) / "fusion" / "val.safetensors").is_file():
        out["fusion"] = Path(fused) / "fusion"
    return out


def thresholds_for(truth: dict, val_scores: dict, cfg: ThresholdConfig, masks: bool) -> dict[str, dict]:
    """{category: {"image", "pixel", "warnings"}} chosen on `truth`'s val rows (`fusion.val_truth`)."""
    out = {}
    for cat, (ids, labels, gt) in truth.items():
        rows = [mf.Row(i, cat, "val", 0, "", "", "", 0) for i in ids]
        image, maps = ev.align(rows, *val_scores[cat])
        out[cat] = category_thresholds(labels, image, gt, maps, cfg, cat, masks)
    return out


def test_threshold_metrics(rows: Sequence[mf.Row], test_scores: dict, thresholds: dict, size: int,
                           masks: bool) -> dict:
    """{"per_category": {cat: {image: {...}, pixel: {...}}}, "mean": {image_f1, ...}} on the TEST rows."""
    per_cat = {}
    for cat, t in thresholds.items():
        part = mf.rows_for(rows, cat, "test")
        image, maps = ev.align(part, *test_scores[cat])
        gt = ev.masks_for(part, size) if masks else None
        per_cat[cat] = threshold_metrics(np.array([r.label for r in part]), image, gt, maps, t, masks)
    mean = {f"{level}_{k}": float(np.mean([m[level][k] for m in per_cat.values()]))
            for level in ("image", "pixel") if all(level in m for m in per_cat.values())
            for k in ("precision", "recall", "f1", "fpr")}
    return {"per_category": per_cat, "mean": mean}


def write_bundle(out: Path, method: str, params: dict[str, Any], rows: Sequence[mf.Row], features: Path, models: Path,
                 fused: Path, card: dict[str, Any]) -> dict:
    """Write the bundle of `method` (a registered method or `fusion`) to `out`; returns its card. `params`: the
    export stage's config (its `score` entry holds each method's score-stage params); `models`: data/models."""
    if method == "fusion":
        path = Path(fused) / "fusion" / "model.json"
        if not path.is_file():
            raise DataError(f"{path}: missing (written by the fuse stage); re-run `dvc repro fuse`")
        fusion = read_json(path)
        members = {b: (lambda d, m=fusion[f"{b}_method"]: write_bundle(d, m, params, rows, features, models, fused,
                                                                      {"method": m}))
                   for b in ("clip", "visual")}
        return write_fusion_bundle(out, fusion, members, card)
    inputs = BundleInputs(rows=rows, features=Path(features), models=Path(models) / method, params=params, method=method)
    return deploy_module(method).write_bundle(inputs, Path(out), card)


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


def export_experiment(params: dict[str, Any], rows: Sequence[mf.Row], scores: Path, fused: Path, features: Path,
                      summary: dict, per_category: dict, out: Path, metrics: Path,
                      models: Path = Path("data/models")) -> dict:
    """Choose, threshold, measure and write. `params`: the export stage's resolved config; `summary` /
    `per_category`: evaluate's metrics files; `models`: data/models (fitted states). Returns the card written to
    `out/model.json`. The bundle is written next to `out` and renamed into place when complete."""
    ecfg = build(ExportConfig, params["export"], "export", strict=True)
    tcfg = build(ThresholdConfig, params["threshold"], "threshold", strict=True)
    size, seed = int(params["data"]["image_size"]), int(params["seed"])
    dirs = candidate_dirs(params["methods"], scores, fused)
    truth = val_truth(selection_rows(rows, seed, params.get("holdouts", {})), size)
    val = {m: load_scores(d / "val.safetensors") for m, d in dirs.items()}
    method, val_values = choose_method(val, truth, ecfg.metric, ecfg.method)
    masks = ev.has_masks(rows)  # without masks: no pixel thresholds / metrics
    thresholds = thresholds_for(truth, val[method], tcfg, masks)
    measured = test_threshold_metrics(rows, load_scores(dirs[method] / "test.safetensors"), thresholds, size, masks)
    warnings = [w for t in thresholds.values() for w in t["warnings"]]
    protocol = {**summary.get("_protocol", {}),
                "threshold_note": f"thresholds chosen per category on {sum(len(t[0]) for t in truth.values())} val "
                                  f"rows no method trained on (mode {tcfg.mode}); metrics on the test split"}
    if warnings:
        protocol["threshold_warnings"] = warnings
    if not masks:
        protocol["pixel_note"] = "the dataset has no ground-truth masks: no pixel threshold, no pixel metrics"
    write_json(metrics / "threshold.json", jsonable({"method": method, "mode": tcfg.mode, **measured,
                                                    "warnings": warnings, "_protocol": protocol}, 6))
    card = {"method": method, "chosen_by": {"metric": ecfg.metric, "mode": ecfg.method, "val": val_values},
            "params": params, "training_data_sha256": data_hash(rows), "val_metrics": {ecfg.metric: val_values[method]},
            "test_metrics": {"mean": summary.get(method, {}), "per_category": per_category.get(method, {}),
                             "at_threshold": measured},
            "protocol": protocol, "threshold": vars(tcfg),
            "thresholds": {c: {"image": t["image"], "pixel": t["pixel"]} for c, t in thresholds.items()},
            "map_range": {c: [float(np.percentile(val[method][c][2].numpy(), 1)),
                              float(np.percentile(val[method][c][2].numpy(), 99.9))] for c in thresholds}}
    card = jsonable(card, 10)
    return install_bundle(out, lambda tmp: write_bundle(tmp, method, params, rows, features, models, fused, card))


def install_bundle(out: Path, write: Callable[[Path], dict]) -> dict:
    """`write(dir)` the bundle into `<out>.tmp-<pid>`, then swap the complete directory in for `out`
    (`io.replace_dir`): at every instant `out` is the old complete bundle or the new one. Returns `write`'s card."""
    out = Path(out)
    remove_stale_temporaries(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        card = write(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete `<out>.tmp-<pid>` / `<out>.old-<pid>` trees left by an export that was killed (their process is gone);
    returns them. A live process's temporaries are left alone."""
    gone = []
    for p in Path(out).parent.glob(f"{Path(out).name}.*-*"):
        kind, _, pid = p.name[len(Path(out).name) + 1:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0
