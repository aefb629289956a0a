"""DVC stage `export`: the method chosen on val (`export.method`, default best val `export.metric`), its
thresholds chosen on val (`threshold`), the test metrics at those thresholds (`metrics/threshold.json`) and a
self-contained bundle `models/export/` for `anomaly-core predict` (any method, or the fusion: the method's fitted
states from `data/models`, its backbones, and the fusion's alpha and statistics from `data/fused`)."""
from pathlib import Path

import typer

from anomaly_core.data import manifest as mf
from anomaly_core.deploy.export import export_experiment
from anomaly_core.io import read_json, write_json
from stages.common import friendly_errors, get, load_config, run

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(config: Path = typer.Option(Path("data/config/export.json")),
         manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         scores: Path = typer.Option(Path("data/scores")),
         fused: Path = typer.Option(Path("data/fused")),
         features: Path = typer.Option(Path("data/features")),
         models: Path = typer.Option(Path("data/models")),
         metrics: Path = typer.Option(Path("metrics")),
         out: Path = typer.Option(Path("models/export"))) -> None:
    params = load_config(config)
    if get(params, "task") != "anomaly":
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "model.json", {"exported": False, "reason": "task=classification: nothing to export"})
        write_json(metrics / "threshold.json", {"skipped": "task=classification"})
        return typer.echo("export skipped: task=classification")
    card = export_experiment(params, mf.read_manifest(manifest), scores, fused, features,
                             read_json(metrics / "summary.json"), read_json(metrics / "per_category.json"), out, metrics, models)
    for line in card["protocol"].get("threshold_warnings", []):
        typer.echo(f"warning: export: {line}", err=True)
    if card.get("transductive"):
        typer.echo(f"note: export: {card['method']} is transductive: predict scores the images of one call as one pool")
    typer.echo(f"export: {card['method']} (val {card['chosen_by']['metric']} "
               f"{card['val_metrics'][card['chosen_by']['metric']]:.4f}) -> {out}; thresholds ({card['threshold']['mode']}) "
               + ", ".join(f"{c}: {t['image']:.4g}" for c, t in card["thresholds"].items()))


if __name__ == "__main__":
    run(app)
