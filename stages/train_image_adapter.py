"""DVC stage `train_image_adapter`: AA-CLIP stage 2 with the stage-1 anchors frozen."""
from pathlib import Path

import typer

from anomaly_core.tracking import log_history
from stages.common import skip_outputs, device, friendly_errors, get, load_config, progress, seed_everything

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         text_adapters: Path = typer.Option(Path("data/models/aaclip/text.pt")),
         config: Path = typer.Option(Path("data/config/train_image_adapter.json")),
         out: Path = typer.Option(Path("data/models/aaclip/image.pt")),
         history: Path = typer.Option(Path("metrics/train/aaclip_image"), help="training curves (dvclive)")) -> None:
    params = load_config(config)
    if not params["enabled"]:
        skip_outputs("method aaclip not selected (params.yaml: methods)", files=(out,))
        log_history(history, [])
        return
    from anomaly_core.adapters import ImageAdapterConfig, load_text_adapters, save_image_adapters, train_image_adapters
    from anomaly_core.adapters.data import second_dataset_rows, image_set, training_rows
    from anomaly_core import distributed as dist
    from anomaly_core.backbones import backbone_from_config
    from anomaly_core.config import build
    from anomaly_core.data import manifest as mf

    cfg = build(ImageAdapterConfig, {**get(params, "aaclip_image"), "seed": int(get(params, "seed"))}, "aaclip_image")
    seed_everything(cfg.seed)
    size = int(get(params, "data.image_size"))
    ctx = dist.init(device())  # torchrun (dist.nproc > 1): one process per GPU / CPU rank
    ccfg, clip = backbone_from_config(get(params, "backbones.clip"), "backbones.clip", ctx.device)
    _, anchors = load_text_adapters(text_adapters, clip, ccfg.name)
    rows = mf.read_manifest(manifest)
    train, select = training_rows(rows, cfg.seed, float(get(params, "aaclip.holdout_fraction")))
    extra = second_dataset_rows(get(params, "aaclip.train_data"))
    if extra:  # cross-dataset protocol: every image of the second dataset trains; the target's val selects
        train, select = extra, [r for r in rows if r.split == "val"]
    val = image_set(select, clip.image_size, size) if select else None
    adapters, hist = train_image_adapters(clip, anchors, image_set(train, clip.image_size, size), val, cfg, progress())
    chosen = next((h["epoch"] for h in hist if h.get("selected")), cfg.epochs)
    dist.shutdown()
    if not ctx.is_main:
        return
    save_image_adapters(out, adapters, ccfg.name, selected_epoch=chosen)
    log_history(history, hist)
    typer.echo(f"aaclip image adapters: {len(train)} training images, {len(select)} selection images, "
               f"epoch {chosen} selected on validation, {ctx.world_size} process(es)")


if __name__ == "__main__":
    app()
