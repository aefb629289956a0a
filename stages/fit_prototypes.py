"""DVC stage `fit_prototypes`: multi-prototype anchors (seeds/002) and CLIP image prototypes (seeds/004)."""
from pathlib import Path

import typer

from anomaly_core.config import build
from anomaly_core.data import manifest as mf
from anomaly_core.io import write_json
from anomaly_core.prototypes import MultiProtoConfig
from anomaly_core.prototypes.image_protos import fit_image_prototypes, save_image_prototypes
from anomaly_core.prototypes.multi import save_multi_prototype, train_multi_prototype
from anomaly_core.store import FeatureStore
from stages.common import clip_backbone, skip_unless_anomaly, friendly_errors, get, load_params, progress, seed_everything

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         features: Path = typer.Option(Path("data/features")),
         out: Path = typer.Option(Path("data/models/prototypes")),
         diagnostics: Path = typer.Option(Path("metrics/prototype_diagnostics.json"))) -> None:
    params = load_params()
    if skip_unless_anomaly(params, files=(diagnostics,), dirs=(out,)):
        return
    seed = int(get(params, "seed"))
    seed_everything(seed)
    cfg = build(MultiProtoConfig, {**get(params, "multi_prototype"), "seed": seed}, "multi_prototype")
    size = int(get(params, "data.image_size"))
    ccfg, clip = clip_backbone(params)
    rows, store = mf.read_manifest(manifest), FeatureStore(features)
    models, report = train_multi_prototype(store, rows, clip, cfg, size, progress())
    for cat, model in models.items():
        save_multi_prototype(out / "multi_prototype" / f"{cat}.pt", model, ccfg.name, cfg,
                             diagnostics=report[cat]["diagnostics"])
    for cat, protos in fit_image_prototypes(store, rows).items():
        save_image_prototypes(out / "image_prototype" / f"{cat}.pt", protos, ccfg.name)
    write_json(diagnostics, {cat: r["diagnostics"] for cat, r in report.items()})
    for cat, r in report.items():
        d = r["diagnostics"]
        typer.echo(f"multi_prototype {cat}: usage {[round(u, 2) for u in d['normal_usage']]}, "
                   f"collapse {d['abnormal_collapse']}, separation {d['separation']:.3f}, healthy={d['healthy']}")


if __name__ == "__main__":
    app()
