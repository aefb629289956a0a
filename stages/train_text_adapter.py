"""DVC stage `train_text_adapter`: AA-CLIP stage 1 on cached frozen CLIP tokens."""
from pathlib import Path

import typer

from anomaly_core.tracking import log_history
from stages.common import skip_outputs, device, friendly_errors, get, load_config, progress, seed_everything

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         features: Path = typer.Option(Path("data/features")),
         config: Path = typer.Option(Path("data/config/train_text_adapter.json")),
         out: Path = typer.Option(Path("data/models/aaclip/text.pt")),
         history: Path = typer.Option(Path("metrics/train/aaclip_text"), help="training curves (dvclive)")) -> None:
    params = load_config(config)
    if not params["enabled"]:
        skip_outputs("method aaclip not selected (params.yaml: methods)", files=(out,))
        log_history(history, [])
        return
    import torch

    from anomaly_core.adapters import TextAdapterConfig, class_anchors, save_text_adapters, train_text_adapters
    from anomaly_core.adapters.data import second_dataset_rows, text_stage_data, training_rows
    from anomaly_core.backbones import backbone_from_config
    from anomaly_core.config import build
    from anomaly_core.data import manifest as mf
    from anomaly_core.store import FeatureStore

    cfg = build(TextAdapterConfig, {**get(params, "aaclip_text"), "seed": int(get(params, "seed"))}, "aaclip_text")
    seed_everything(cfg.seed)
    size = int(get(params, "data.image_size"))
    ccfg, clip = backbone_from_config(get(params, "backbones.clip"), "backbones.clip", device())
    rows = mf.read_manifest(manifest)
    extra = second_dataset_rows(get(params, "aaclip.train_data"))
    if extra:  # cross-dataset protocol: train on every image of the second dataset
        data = text_stage_data(extra, size, backbone=clip, progress=progress())
    else:
        train, _ = training_rows(rows, cfg.seed, float(get(params, "aaclip.holdout_fraction")))
        data = text_stage_data(train, size, store=FeatureStore(features))
    adapters, anchors, hist = train_text_adapters(clip, data, cfg, progress())
    names = sorted(set(mf.categories(rows)) | set(mf.categories(extra)))
    with torch.no_grad():  # anchors for the target (and second-dataset) categories
        target_anchors = class_anchors(clip, adapters, names).cpu()
    save_text_adapters(out, adapters, target_anchors, names, ccfg.name)
    log_history(history, hist)
    typer.echo(f"aaclip text adapters: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} over {cfg.epochs} epochs")


if __name__ == "__main__":
    app()
