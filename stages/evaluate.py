"""DVC stage `evaluate`: metrics JSON per method and category, ROC/PR plot data, heatmaps, a report."""
from pathlib import Path

import numpy as np
import typer
from tqdm.auto import tqdm

from anomaly_core import evaluation as ev
from anomaly_core.data import manifest as mf
from anomaly_core.features import load_resized
from anomaly_core.io import read_json, write_json, write_text
from anomaly_core.prompts.vpt import comparison
from anomaly_core.store import load_scores
from anomaly_core.viz import save_curve_plot, save_heatmap_overlays
from stages.common import friendly_errors, get, load_params, progress

app = typer.Typer(add_completion=False)
METHOD_ORDER = ["zero_shot_clip", "knn", "aaclip", "multi_prototype", "prompt_clip", "vpt_knn", "fusion"]


def methods_in(*dirs: Path) -> dict[str, Path]:
    """{method: its score directory}, in the report order."""
    found = {p.name: p for d in dirs if d.is_dir() for p in d.iterdir() if (p / "test.safetensors").is_file()}
    return dict(sorted(found.items(), key=lambda kv: (METHOD_ORDER.index(kv[0]) if kv[0] in METHOD_ORDER else 99, kv[0])))


def heatmaps(path: Path, rows, image, maps, masks, size: int, n: int, method: str) -> None:
    """A few test images per category, anomalous first, with their ground truth and map."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].label, rows[i].id))[:n]
    lo, hi = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    save_heatmap_overlays(path, [load_resized(rows[i].image, size) for i in order], [masks[i] for i in order],
                          [maps[i] for i in order],
                          [f"{method} {rows[i].defect_type} score={image[i]:.3f}" for i in order], vmin=lo, vmax=hi)


def classification_only(protocol: dict, metrics: Path, reports: Path) -> None:
    """task=classification: no anomaly methods ran; the numbers are in metrics/classification.json."""
    protocol = {**protocol, "task": "classification", "note": "anomaly stages skipped; see metrics/classification.json"}
    write_json(metrics / "summary.json", {"_protocol": protocol})
    write_json(metrics / "per_category.json", {"_protocol": protocol})
    for sub in ("roc", "pr"):
        (metrics / "plots" / sub).mkdir(parents=True, exist_ok=True)
    write_json(metrics / "vpt_comparison.json", {})
    write_text(reports / "report.md", "# anomaly_core report\n\ntask=classification: see metrics/classification.json\n")


def report(summary: dict, info: dict, protocol: dict, fusion: dict | None = None, cls: dict | None = None) -> str:
    lines = ["# anomaly_core report", "", f"Protocol: {protocol['note']}.", ""]
    for branch, b in info.items():
        state = "UNTRAINED (random weights): its numbers say nothing about real CLIP" if b["untrained"] else b["pretrained"]
        lines.append(f"- {branch} backbone: `{b['name']}` — {state}")
    cols = list(ev.IMAGE_METRICS + ev.PIXEL_METRICS)
    lines += ["", "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, m in summary.items():
        if not method.startswith("_"):
            lines.append(f"| {method} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    if fusion:
        lines += ["", f"Fusion: `{fusion['branches']['clip']}` (CLIP branch) + `{fusion['branches']['visual']}`, "
                      f"alpha = {fusion['alpha']} chosen on val by {fusion['metric']} "
                      f"(val: clip {fusion['val']['clip']:.4f}, visual {fusion['val']['visual']:.4f}, "
                      f"fusion {fusion['val']['fusion']:.4f}); scores standardised per category on val statistics."]
    if cls:
        temps = ", ".join(f"{b} {t:.3g}" for b, t in cls.get("temperatures", {}).items())
        lines += ["", f"Classification (metrics/classification.json): temperatures fitted on val: {temps}; "
                      f"alpha = {cls.get('alpha')} ({cls.get('alpha_clip_branch')} + cnn_linear); "
                      f"chosen on val: {cls.get('chosen')}; stacker worse than the best single branch on val: "
                      f"{cls.get('stacker', {}).get('worse_than_best_single')}."]
    lines += ["", "Heatmaps: `reports/heatmaps/`; curves: `reports/roc.png`, `reports/pr.png`, `reports/alpha_curve.png`.", ""]
    return "\n".join(lines)


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         scores: Path = typer.Option(Path("data/scores")),
         fused: Path = typer.Option(Path("data/fused")),
         features_info: Path = typer.Option(Path("data/features/info.json")),
         metrics: Path = typer.Option(Path("metrics")),
         reports: Path = typer.Option(Path("reports"))) -> None:
    params = load_params()
    size, max_fpr = int(get(params, "data.image_size")), float(get(params, "evaluate.max_fpr"))
    n_heat = int(get(params, "evaluate.n_heatmaps"))
    info = read_json(features_info)
    protocol = ev.protocol_note(float(get(params, "data.val_fraction")), [b for b, v in info.items() if v["untrained"]])
    if params.get("task", "anomaly") != "anomaly":
        classification_only(protocol, metrics, reports)
        return
    rows = mf.read_manifest(manifest)
    cats = mf.categories(rows)
    test_rows = {c: mf.rows_for(rows, c, "test") for c in cats}
    masks = {c: ev.masks_for(test_rows[c], size) for c in cats}
    summary, per_category, curves = {}, {}, {"roc": {}, "pr": {}}
    for method, where in tqdm(methods_in(scores, fused).items(), desc="evaluate", disable=not progress()):
        test, val = load_scores(where / "test.safetensors"), load_scores(where / "val.safetensors")
        per_cat, pooled_labels, pooled_scores = {}, [], []
        for c in cats:
            labels = np.array([r.label for r in test_rows[c]])
            image, maps = ev.align(test_rows[c], *test[c])
            per_cat[c] = ev.category_metrics(labels, masks[c], image, maps, max_fpr, category=c)
            pooled_labels.append(labels)
            pooled_scores.append(ev.standardise(image, val[c][1].numpy()))
            heatmaps(reports / "heatmaps" / f"{method}_{c}.png", test_rows[c], image, maps, masks[c], size, n_heat, method)
        per_category[method] = ev.rounded(per_cat)
        summary[method] = ev.rounded(ev.mean_metrics(per_cat))
        cv = ev.pooled_curves(np.concatenate(pooled_labels), np.concatenate(pooled_scores))
        write_json(metrics / "plots" / "roc" / f"{method}.json", [{"fpr": x, "tpr": y} for x, y in zip(cv["fpr"], cv["tpr"])])
        write_json(metrics / "plots" / "pr" / f"{method}.json",
                   [{"recall": x, "precision": y} for x, y in zip(cv["recall"], cv["precision"])])
        curves["roc"][method], curves["pr"][method] = (cv["fpr"], cv["tpr"]), (cv["recall"], cv["precision"])
    summary["_protocol"] = protocol
    per_category["_protocol"] = protocol
    write_json(metrics / "summary.json", summary)
    write_json(metrics / "per_category.json", per_category)
    save_curve_plot(reports / "roc.png", curves["roc"], "false positive rate", "true positive rate",
                    "Image ROC (test, scores standardised per category on val)")
    save_curve_plot(reports / "pr.png", curves["pr"], "recall", "precision", "Image PR (test)")
    if "vpt_knn" in per_category and "knn" in per_category:
        write_json(metrics / "vpt_comparison.json", {c: comparison(per_category["vpt_knn"][c], per_category["knn"][c], c)
                                                     for c in cats})
    fusion_report = read_json(metrics / "fusion.json") if (metrics / "fusion.json").is_file() else None
    if fusion_report:
        save_curve_plot(reports / "alpha_curve.png", {"fusion": tuple(zip(*fusion_report["curve"]))}, "alpha (CLIP weight)",
                        f"val {fusion_report['metric']}", f"Fusion alpha sweep on val: {fusion_report['branches']}")
    details = metrics / "classification_details.json"
    cls = read_json(details) if details.is_file() else None
    write_text(reports / "report.md", report(summary, info, protocol, fusion_report, cls))
    for method, m in summary.items():
        if not method.startswith("_"):
            typer.echo(f"{method:>16}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()))


if __name__ == "__main__":
    app()
