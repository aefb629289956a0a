"""DVC stage `fuse`: CLIP + visual anomaly-score fusion chosen on val, and the few-shot classification task
(branches, temperature scaling, alpha fusion, stacker), chosen on val and reported on test."""
from pathlib import Path

import numpy as np
import torch
import typer

from anomaly_core.classification import ClassificationConfig, class_prompts, class_splits, run_classification
from anomaly_core.config import build
from anomaly_core.data import manifest as mf
from anomaly_core.data.holdout import selection_rows
from anomaly_core.evaluation import masks_for, protocol_note, rounded
from anomaly_core.fusion import FusionConfig, fuse_scores, select_clip_method
from anomaly_core.io import write_json
from anomaly_core.store import FeatureStore, load_scores, save_scores
from stages.common import clip_backbone, friendly_errors, get, load_params

app = typer.Typer(add_completion=False)
HOLDOUT_KEYS = ("aaclip.holdout_fraction", "multi_prototype.holdout_fraction", "prompt_clip.holdout_fraction",
                "vpt_knn.holdout_fraction")
CLIP_PREFERENCE = ["aaclip", "prompt_clip", "multi_prototype", "zero_shot_clip", "image_prototype"]


def val_truth(rows, size: int) -> dict:
    """{category: (ids, labels [N], masks [N, S, S])} of the given val rows."""
    out = {}
    for cat in mf.categories(rows):
        part = [r for r in rows if r.category == cat]
        out[cat] = ([r.id for r in part], np.array([r.label for r in part]), masks_for(part, size))
    return out


def anomaly_fusion(params, rows, scores: Path, out: Path, metrics: Path) -> None:
    cfg = build(FusionConfig, params.get("fusion"), "fusion")
    size = int(get(params, "data.image_size"))
    # choose on the val rows that no method trained on (the smallest holdout every trained method kept)
    fraction = min(float(get(params, k)) for k in HOLDOUT_KEYS)
    truth = val_truth(selection_rows(rows, int(get(params, "seed")), fraction), size)
    have = [m for m in CLIP_PREFERENCE if (scores / m / "val.safetensors").is_file()]
    clip_method, clip_vals = select_clip_method(
        cfg, {m: load_scores(scores / m / "val.safetensors") for m in have}, truth, CLIP_PREFERENCE)
    branch = lambda m: {s: load_scores(scores / m / f"{s}.safetensors") for s in ("val", "test")}
    fused, report = fuse_scores(branch(clip_method), branch(cfg.visual_method), truth, cfg, clip_method)
    for split, per_cat in fused.items():
        save_scores(out / "fusion" / f"{split}.safetensors", per_cat)
    report["clip_candidates_val"] = clip_vals
    report["selection_rows"] = {c: len(t[0]) for c, t in truth.items()}
    write_json(metrics / "fusion.json", rounded_report(report))
    write_json(metrics / "plots" / "alpha_curve.json", [{"alpha": a, f"val_{cfg.metric}": v} for a, v in report["curve"]])
    typer.echo(f"fusion: {clip_method} + {cfg.visual_method}, alpha={report['alpha']} chosen on val "
               f"({cfg.metric}: clip {report['val']['clip']:.4f}, visual {report['val']['visual']:.4f}, "
               f"fusion {report['val']['fusion']:.4f})")


def rounded_report(report: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}


def classification(params, rows, features: Path, metrics: Path) -> None:
    cfg = build(ClassificationConfig, params.get("classification"), "classification")
    seed = int(get(params, "seed"))
    store = FeatureStore(features)
    names, splits = class_splits(store, rows)
    text = None
    if store.has("clip"):
        ccfg, clip = clip_backbone(params)
        with torch.no_grad():
            text = clip.text_anchors([class_prompts(n.replace("/", " ")) for n in names]).numpy()
    report, details = run_classification(splits["train"], splits["val"], splits["test"], len(names), cfg, text, seed)
    untrained = [b for b, v in store.info.items() if v["untrained"]]
    out = {m: rounded(v) for m, v in report.items()}
    out["_protocol"] = {**protocol_note(float(get(params, "data.val_fraction")), untrained),
                        "classes": len(names), "shots_per_class": int(min(np.bincount(splits["train"].labels)))}
    write_json(metrics / "classification.json", out)
    write_json(metrics / "classification_details.json", details)
    typer.echo("classification (test): " + ", ".join(f"{m} top1={v['top1']:.3f}" for m, v in report.items()))


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         classes: Path = typer.Option(Path("data/prepared/classification.csv")),
         scores: Path = typer.Option(Path("data/scores")),
         features: Path = typer.Option(Path("data/features")),
         out: Path = typer.Option(Path("data/fused")),
         metrics: Path = typer.Option(Path("metrics"))) -> None:
    params = load_params()
    if params.get("task", "anomaly") == "anomaly":
        anomaly_fusion(params, mf.read_manifest(manifest), scores, out, metrics)
    else:
        (out / "fusion").mkdir(parents=True, exist_ok=True)
    classification(params, mf.read_manifest(classes), features, metrics)


if __name__ == "__main__":
    app()
