"""DVC stage `prepare`: read the dataset, validate it, carve validation from test, select the k shots.

Writes `images.csv` (every image with its source split; what `features` depends on, so that changing
`shots`, `seed` or `data.val_fraction` never re-extracts features) and `manifest.csv` (final splits + shots).
"""
from pathlib import Path

import typer

from anomaly_core.config import DataConfig, build, shots_value
from anomaly_core.data import manifest as mf
from anomaly_core.data import readers
from anomaly_core.errors import ConfigError
from stages.common import friendly_errors, get, load_config

app = typer.Typer(add_completion=False)


def read_rows(cfg: DataConfig, demo_root: Path) -> list[mf.Row]:
    if cfg.format == "demo":
        return readers.read_mvtec(demo_root, cfg.categories)
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root={cfg.root}: directory not found (point it at your {cfg.format} dataset)")
    return {"mvtec": readers.read_mvtec, "visa": readers.read_visa, "imagefolder": readers.read_imagefolder}[cfg.format](
        root, cfg.categories)


@app.command()
@friendly_errors
def main(demo_root: Path = typer.Option(Path("data/demo")),
         config: Path = typer.Option(Path("data/config/prepare.json")),
         out: Path = typer.Option(Path("data/prepared"))) -> None:
    params = load_config(config)
    cfg = build(DataConfig, get(params, "data"), "data")
    shots, seed, task = shots_value(get(params, "shots")), int(get(params, "seed")), get(params, "task")
    rows = read_rows(cfg, demo_root)
    readers.validate_rows(rows)
    mf.write_manifest(rows, out / "images.csv")
    classes = mf.classification_rows(rows, cfg.val_fraction, cfg.val_fraction, shots, seed)
    mf.write_manifest(classes, out / "classification.csv")
    if task == "classification" or cfg.format == "imagefolder":
        final = classes  # no anomaly task on an image folder
    else:
        final = mf.select_shots(mf.carve_val(rows, cfg.val_fraction, seed), shots, seed)
    mf.write_manifest(final, out / "manifest.csv")
    counts = {s: sum(r.split == s for r in final) for s in ("train", "val", "test")}
    typer.echo(f"manifest: {len(final)} images in {len(mf.categories(final))} categories, {counts}, "
               f"{sum(r.shot for r in final)} shots")


if __name__ == "__main__":
    app()
