"""DVC stage `fuse`: CLIP-branch + visual-branch anomaly-score fusion, alpha chosen on val.

The CLIP-branch candidates are the selected methods whose registry role is `clip` (registry order breaks
ties; `validate` resolves roles and holdout shares into fuse.json); the visual branch is `fusion.visual_method`. Without both, fusion is skipped and says why.
"""
from pathlib import Path

import typer

from anomaly_core.io import write_json
from stages.common import friendly_errors, get, load_config, run

app = typer.Typer(add_completion=False)


def skip(reason: str, out: Path, metrics: Path) -> None:
    (out / "fusion").mkdir(parents=True, exist_ok=True)
    write_json(metrics / "fusion.json", {"skipped": reason})
    write_json(metrics / "plots" / "alpha_curve.json", [])
    typer.echo(f"fusion skipped: {reason}")


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         config: Path = typer.Option(Path("data/config/fuse.json")),
         scores: Path = typer.Option(Path("data/scores")),
         out: Path = typer.Option(Path("data/fused")),
         metrics: Path = typer.Option(Path("metrics"))) -> None:
    params = load_config(config)
    if get(params, "task") != "anomaly":
        return skip("task=classification", out, metrics)
    if params.get("skip"):  # no visual + CLIP pair among the selected methods (decided by `validate`)
        return skip(params["skip"], out, metrics)
    from anomaly_core.config import build
    from anomaly_core.data import manifest as mf
    from anomaly_core.data.holdout import selection_protocol, selection_rows
    from anomaly_core.fusion import FusionConfig, fuse_scores, fusion_model, select_clip_method, val_truth
    from anomaly_core.store import load_scores, save_scores

    cfg = build(FusionConfig, get(params, "fusion"), "fusion")
    methods = get(params, "methods")
    clip_methods = [m for m in methods if get(params, "roles")[m] == "clip"]
    size, rows = int(get(params, "data.image_size")), mf.read_manifest(manifest)
    # choose on the val rows that no method trained on (the smallest holdout every selected trained method kept)
    holdouts, seed = get(params, "holdouts"), int(get(params, "seed"))
    truth = val_truth(selection_rows(rows, seed, holdouts), size)
    clip_method, clip_vals = select_clip_method(
        cfg, {m: load_scores(scores / m / "val.safetensors") for m in clip_methods}, truth, clip_methods)
    branch = lambda m: {s: load_scores(scores / m / f"{s}.safetensors") for s in ("val", "test")}
    fused, report = fuse_scores(branch(clip_method), branch(cfg.visual_method), truth, cfg, clip_method)
    for split, per_cat in fused.items():
        save_scores(out / "fusion" / f"{split}.safetensors", per_cat)
    write_json(out / "fusion" / "model.json", fusion_model(report))  # what `export` needs to fuse new images
    report.pop("stats")
    report["clip_candidates_val"] = clip_vals
    report["selection_rows"] = {c: len(t[0]) for c, t in truth.items()}
    report["_protocol"] = {"selection": selection_protocol(rows, seed, holdouts)}
    write_json(metrics / "fusion.json", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()})
    write_json(metrics / "plots" / "alpha_curve.json", [{"alpha": a, f"val_{cfg.metric}": v} for a, v in report["curve"]])
    typer.echo(f"fusion: {clip_method} + {cfg.visual_method}, alpha={report['alpha']} chosen on val "
               f"({cfg.metric}: clip {report['val']['clip']:.4f}, visual {report['val']['visual']:.4f}, "
               f"fusion {report['val']['fusion']:.4f})")


if __name__ == "__main__":
    run(app)
