"""DVC stage `train_image_adapter`: AA-CLIP stage 2 with the stage-1 anchors frozen."""
from pathlib import Path

import typer

from anomaly_core.tracking import log_history
from stages.common import device, friendly_errors, get, load_config, progress, run, seed_everything, skip_outputs

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
    from anomaly_core.methods import get_method

    seed_everything(int(get(params, "seed")))
    train = get_method("aaclip").stage_function("train_image_adapter")
    hist, summary = train(params, manifest, text_adapters, out, device(), progress())
    if summary:  # the main process (the others of a torchrun group write nothing)
        log_history(history, hist)
        typer.echo(summary)


if __name__ == "__main__":
    run(app)
