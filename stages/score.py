"""DVC stage `score`: every enabled method writes image scores and pixel maps for val and test."""
from pathlib import Path

import typer

from anomaly_core.backbones import create_backbone
from anomaly_core.config import BackboneConfig, KnnConfig, ZeroShotConfig, build
from anomaly_core.data import manifest as mf
from anomaly_core.prompts import build_prompts
from anomaly_core.scoring import knn_scores, zero_shot_clip_scores
from anomaly_core.store import FeatureStore, save_scores
from stages.common import friendly_errors, get, load_params, progress, seed_everything

app = typer.Typer(add_completion=False)


def write(out: Path, method: str, scores) -> None:
    for split, per_cat in scores.items():
        save_scores(out / method / f"{split}.safetensors", per_cat)
    typer.echo(f"scored {method}")


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         features: Path = typer.Option(Path("data/features")),
         models: Path = typer.Option(Path("data/models")),
         out: Path = typer.Option(Path("data/scores"))) -> None:
    params = load_params()
    seed = int(get(params, "seed"))
    seed_everything(seed)
    size = int(get(params, "data.image_size"))
    rows = mf.read_manifest(manifest)
    store = FeatureStore(features)
    write(out, "knn", knn_scores(store, rows, build(KnnConfig, params.get("knn"), "knn"), size, seed, progress()))
    if store.has("clip"):
        ccfg = build(BackboneConfig, get(params, "backbones.clip"), "backbones.clip")
        clip = create_backbone(ccfg.name, ccfg.pretrained, ccfg.levels, ccfg.image_size)
        anchors = {c: clip.text_anchors(build_prompts(c)) for c in mf.categories(rows)}
        zcfg = build(ZeroShotConfig, params.get("zero_shot"), "zero_shot")
        write(out, "zero_shot_clip", zero_shot_clip_scores(store, rows, anchors, zcfg, size))


if __name__ == "__main__":
    app()
