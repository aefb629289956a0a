"""DVC stage `evaluate`: metrics JSON per method and category, ROC/PR plot data, heatmaps, a report."""
from pathlib import Path

import typer

from anomaly_core import reporting as rp
from anomaly_core import review
from anomaly_core.config import EvaluateConfig, build
from anomaly_core.deploy.thresholds import ThresholdConfig
from anomaly_core.data import manifest as mf
from anomaly_core.data.holdout import selection_protocol
from anomaly_core.io import read_json, write_json, write_text
from stages.common import friendly_errors, get, load_config, progress, run

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         config: Path = typer.Option(Path("data/config/evaluate.json")),
         scores: Path = typer.Option(Path("data/scores")),
         fused: Path = typer.Option(Path("data/fused")),
         features_info: Path = typer.Option(Path("data/features/info.json")),
         warnings: Path = typer.Option(Path("data/prepared/warnings.json"), help="prepare's input warnings"),
         metrics: Path = typer.Option(Path("metrics")),
         reports: Path = typer.Option(Path("reports"))) -> None:
    params = load_config(config)
    cfg = build(EvaluateConfig, get(params, "evaluate"), "evaluate")
    size, methods, info = int(get(params, "data.image_size")), get(params, "methods"), read_json(features_info)
    rows = mf.read_manifest(manifest)
    protocol = rp.protocol(float(get(params, "data.val_fraction")), info, methods, get(params, "transductive"),
                           masks=rp.ev.has_masks(rows), input_warnings=read_json(warnings))
    protocol["selection"] = selection_protocol(rows, int(get(params, "seed")), get(params, "holdouts"))
    if get(params, "task") != "anomaly":
        return rp.classification_only(protocol, metrics, reports)
    dirs = rp.score_dirs(methods, scores, fused)
    summary, per_category = rp.evaluate_methods(rows, dirs, size, cfg.max_fpr, cfg.n_heatmaps, metrics, reports,
                                                progress(), cfg.pixel_size)
    write_json(metrics / "summary.json", {**summary, "_protocol": protocol})
    write_json(metrics / "per_category.json", {**per_category, "_protocol": protocol})
    write_json(metrics / "vpt_comparison.json", rp.baseline_comparison(per_category, get(params, "baselines")))
    fusion = rp.optional_json(metrics / "fusion.json")
    rp.alpha_curve_figure(fusion, reports)
    write_text(reports / "report.md", rp.report_markdown(summary, info, protocol, fusion,
                                                         rp.optional_json(metrics / "classification_details.json")))
    if cfg.review:
        review.write_review(rows, dirs, size, build(ThresholdConfig, get(params, "threshold"), "threshold"),
                            int(get(params, "seed")), get(params, "holdouts"), per_category, reports)
    for method, m in summary.items():
        typer.echo(f"{method:>16}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()))


if __name__ == "__main__":
    run(app)
