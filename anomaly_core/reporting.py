"""The `evaluate` stage's work: metrics per method and category on test, pooled ROC/PR data, heatmaps, figures
and the markdown report. Methods are reported in registry order, then `fusion`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from anomaly_core import evaluation as ev
from anomaly_core.data import manifest as mf
from anomaly_core.features import load_resized
from anomaly_core.io import read_json, write_json, write_text
from anomaly_core.store import load_scores
from anomaly_core.viz import save_curve_plot, save_heatmap_overlays


def protocol(val_fraction: float, info: dict, methods: Sequence[str], transductive: Sequence[str],
             masks: bool = True, input_warnings: Sequence[str] = ()) -> dict:
    """`_protocol` of the anomaly metrics files: the shared note, untrained backbones, the selected methods and
    which of them are transductive (they read other test images when scoring one); `masks=False` (a dataset
    without ground-truth masks) says why the pixel metrics are absent; `input_warnings` are prepare's (empty
    defect masks, categories skipped by `data.on_one_class: skip`)."""
    out = ev.protocol_note(val_fraction, [b for b, v in info.items() if v["untrained"]], input_warnings)
    if not masks:
        out["pixel_metrics"] = ev.NO_MASKS_NOTE
    out["methods"] = list(methods)
    out["transductive"] = list(transductive)
    if transductive:
        out["transductive_note"] = (f"{', '.join(transductive)} score each val/test image against the other "
                                    "unlabeled val/test images of its category (their pixels, never their labels)")
    return out


def score_dirs(methods: Sequence[str], scores: Path, fused: Path) -> dict[str, Path]:
    """{method: its score directory} for the selected methods (registry order) and `fusion` when it ran."""
    out = {m: scores / m for m in methods}
    if (fused / "fusion" / "test.safetensors").is_file():
        out["fusion"] = fused / "fusion"
    return out


def heatmaps(path: Path, rows, image, maps, masks, size: int, n: int, method: str) -> None:
    """A few test images per category, anomalous first, with their ground truth and map."""
    if n <= 0:
        return
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].label, rows[i].id))[:n]
    lo, hi = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    save_heatmap_overlays(path, [load_resized(rows[i].image, size) for i in order], [masks[i] for i in order],
                          [maps[i] for i in order],
                          [f"{method} {rows[i].defect_type} score={image[i]:.3f}" for i in order], vmin=lo, vmax=hi)


def evaluate_methods(rows, dirs: dict[str, Path], size: int, max_fpr: float, n_heatmaps: int, metrics: Path,
                     reports: Path, progress: bool = False, pixel_size: int = 0) -> tuple[dict, dict]:
    """Test metrics of every method in `dirs` -> (summary {method: mean metrics}, per_category); writes the
    ROC/PR plot data (scores standardised per category on val, pooled), heatmaps and the ROC/PR figures.

    `pixel_size` > 0: pixel metrics at that side (masks resized by nearest neighbour, each category's maps
    bilinearly, one category at a time so 1,024 px maps of one method and category are the largest array)."""
    cats = mf.categories(rows)
    test_rows = {c: mf.rows_for(rows, c, "test") for c in cats}
    pixel = ev.has_masks(rows)  # without masks: image metrics only
    masks = {c: ev.masks_for(test_rows[c], pixel_size or size) for c in cats}
    summary, per_category, curves = {}, {}, {"roc": {}, "pr": {}}
    for method, where in tqdm(dirs.items(), desc="evaluate", disable=not progress):
        test, val = load_scores(where / "test.safetensors", True), load_scores(where / "val.safetensors", True)
        per_cat, pooled_labels, pooled_scores = {}, [], []
        for c in cats:
            labels = np.array([r.label for r in test_rows[c]])
            image, maps = ev.align(test_rows[c], *test[c])
            maps = ev.at_size(maps, pixel_size or size)
            per_cat[c] = ev.category_metrics(labels, masks[c] if pixel else None, image, maps, max_fpr, category=c)
            pooled_labels.append(labels)
            pooled_scores.append(ev.standardise(image, val[c][1].numpy()))
            heatmaps(reports / "heatmaps" / f"{method}_{c}.png", test_rows[c], image, maps, masks[c], size,
                     n_heatmaps, method)
        per_category[method] = ev.rounded(per_cat)
        summary[method] = ev.rounded(ev.mean_metrics(per_cat))
        cv = ev.pooled_curves(np.concatenate(pooled_labels), np.concatenate(pooled_scores))
        write_json(metrics / "plots" / "roc" / f"{method}.json", [{"fpr": x, "tpr": y} for x, y in zip(cv["fpr"], cv["tpr"])])
        write_json(metrics / "plots" / "pr" / f"{method}.json",
                   [{"recall": x, "precision": y} for x, y in zip(cv["recall"], cv["precision"])])
        curves["roc"][method], curves["pr"][method] = (cv["fpr"], cv["tpr"]), (cv["recall"], cv["precision"])
    save_curve_plot(reports / "roc.png", curves["roc"], "false positive rate", "true positive rate",
                    "Image ROC (test, scores standardised per category on val)")
    save_curve_plot(reports / "pr.png", curves["pr"], "recall", "precision", "Image PR (test)")
    return summary, per_category


def _pick(metrics: Mapping[str, Any], keys: Sequence[str]) -> float:
    for k in keys:
        if k in metrics:
            return float(metrics[k])
    raise KeyError(f"comparison: none of {list(keys)} in {sorted(metrics)}")


def comparison(tuned_metrics: Mapping[str, Any], baseline_metrics: Mapping[str, Any],
               category: str | None = None) -> dict[str, Any]:
    """The seed's comparison JSON from two metric dicts (keys `image_auroc`/`auroc` and
    `image_ap`/`average_precision`/`ap`): {prompt_tuned, baseline: {auroc, average_precision},
    improvement: {auroc, auroc_relative (%), average_precision, ap_relative (%)}} (+ category)."""
    side = lambda m: {"auroc": _pick(m, ("image_auroc", "auroc")),
                      "average_precision": _pick(m, ("image_ap", "average_precision", "ap"))}
    t, b = side(tuned_metrics), side(baseline_metrics)
    rel = lambda new, old: 100.0 * (new - old) / old if old else None
    out: dict[str, Any] = {"category": category} if category is not None else {}
    out.update(prompt_tuned=t, baseline=b, improvement={
        "auroc": t["auroc"] - b["auroc"], "auroc_relative": rel(t["auroc"], b["auroc"]),
        "average_precision": t["average_precision"] - b["average_precision"],
        "ap_relative": rel(t["average_precision"], b["average_precision"])})
    return out


def baseline_comparison(per_category: dict, baselines: dict[str, str]) -> dict:
    """A method against the baseline it declares (`Method.baseline`: VPT against plain kNN) per category, the seed's
    comparison JSON (`metrics/vpt_comparison.json`); {} unless a method and its baseline both ran."""
    pairs = [(m, b) for m, b in baselines.items() if m in per_category and b in per_category]
    if not pairs:
        return {}
    method, base = pairs[0]
    return {c: comparison(per_category[method][c], per_category[base][c], c) for c in per_category[base]}


def alpha_curve_figure(fusion_report: dict | None, reports: Path) -> None:
    if fusion_report and "curve" in fusion_report:
        save_curve_plot(reports / "alpha_curve.png", {"fusion": tuple(zip(*fusion_report["curve"]))},
                        "alpha (CLIP weight)", f"val {fusion_report['metric']}",
                        f"Fusion alpha sweep on val: {fusion_report['branches']}")


def report_markdown(summary: dict, info: dict, protocol_: dict, fusion: dict | None = None,
                    cls: dict | None = None) -> str:
    lines = ["# anomaly_core report", "", f"Protocol: {protocol_['note']}.", ""]
    for branch, b in info.items():
        state = "UNTRAINED (random weights): its numbers say nothing about real CLIP" if b["untrained"] else b["pretrained"]
        lines.append(f"- {branch} backbone: `{b['name']}` — {state}")
    if protocol_.get("transductive"):
        lines.append(f"- transductive: {protocol_['transductive_note']}")
    present = [m for k, m in summary.items() if not k.startswith("_")]
    cols = [c for c in ev.IMAGE_METRICS + ev.PIXEL_METRICS if all(c in m for m in present)]
    if protocol_.get("pixel_metrics"):
        lines.append(f"- pixel metrics: {protocol_['pixel_metrics']}")
    lines += ["", "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, m in summary.items():
        if not method.startswith("_"):
            lines.append(f"| {method} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    if fusion and "alpha" in fusion:
        lines += ["", f"Fusion: `{fusion['branches']['clip']}` (CLIP branch) + `{fusion['branches']['visual']}`, "
                      f"alpha = {fusion['alpha']} chosen on val by {fusion['metric']} "
                      f"(val: clip {fusion['val']['clip']:.4f}, visual {fusion['val']['visual']:.4f}, "
                      f"fusion {fusion['val']['fusion']:.4f}); scores standardised per category on val statistics."]
    elif fusion and "skipped" in fusion:
        lines += ["", f"Fusion skipped: {fusion['skipped']}."]
    if cls:
        temps = ", ".join(f"{b} {t:.3g}" for b, t in cls.get("temperatures", {}).items())
        lines += ["", f"Classification (metrics/classification.json): temperatures fitted on val: {temps}; "
                      f"alpha = {cls.get('alpha')} ({cls.get('alpha_clip_branch')} + cnn_linear); "
                      f"chosen on val: {cls.get('chosen')}; stacker worse than the best single branch on val: "
                      f"{cls.get('stacker', {}).get('worse_than_best_single')}."]
    lines += ["", "Heatmaps: `reports/heatmaps/`; curves: `reports/roc.png`, `reports/pr.png`, `reports/alpha_curve.png`.", ""]
    return "\n".join(lines)


def classification_only(protocol_: dict, metrics: Path, reports: Path) -> None:
    """task=classification: no anomaly methods ran; the numbers are in metrics/classification.json."""
    protocol_ = {**protocol_, "task": "classification", "note": "anomaly stages skipped; see metrics/classification.json"}
    write_json(metrics / "summary.json", {"_protocol": protocol_})
    write_json(metrics / "per_category.json", {"_protocol": protocol_})
    for sub in ("roc", "pr"):
        (metrics / "plots" / sub).mkdir(parents=True, exist_ok=True)
    write_json(metrics / "vpt_comparison.json", {})
    write_text(reports / "report.md", "# anomaly_core report\n\ntask=classification: see metrics/classification.json\n")


def optional_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None
