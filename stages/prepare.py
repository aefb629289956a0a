"""DVC stage `prepare`: check every input file, carve validation from test, select the shots.

Runs after `validate` (params and backbones checked). Before anything is written: every image is decoded fully
and every mask read (in threads), and categories whose test / val split lacks a class are refused or skipped
(`data.on_one_class`).

Writes `images.csv` (every image with its source split; what `features` depends on, so that changing
`shots`, `seed` or `data.val_fraction` never re-extracts features), `manifest.csv` (final splits + shots)
and `warnings.json` (the input warnings, for the metrics' `_protocol`).
"""
import time
from pathlib import Path

import typer

from anomaly_core.config import DataConfig, build, shots_value
from anomaly_core.data import checks, readers
from anomaly_core.data import manifest as mf
from anomaly_core.io import write_json
from stages.common import friendly_errors, get, load_config, run

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(demo_root: Path = typer.Option(Path("data/demo")),
         config: Path = typer.Option(Path("data/config/prepare.json")),
         out: Path = typer.Option(Path("data/prepared"))) -> None:
    params = load_config(config)
    cfg = build(DataConfig, get(params, "data"), "data", strict=True)
    shots, seed, task = shots_value(get(params, "shots")), int(get(params, "seed")), get(params, "task")
    rows = readers.read_dataset(cfg, demo_root, seed)
    start = time.perf_counter()
    warnings, results = checks.check_files(rows, max_pixels=cfg.max_pixels)
    typer.echo(f"inputs: {len(rows)} images decoded and masks checked in {time.perf_counter() - start:.2f}s "
               f"({checks.default_workers()} threads)")
    anomaly = task == "anomaly" and cfg.format != "imagefolder"
    if anomaly:
        carved = mf.carve_val(rows, cfg.val_fraction, seed)
        # a dataset without masks (data.format folder) is evaluated on image metrics only
        pixels = {r.id: c.mask_pixels for r, c in zip(rows, results)} if any(r.mask for r in rows) else None
        kept, skipped = checks.apply_on_one_class(carved, checks.class_problems(carved, pixels), cfg.on_one_class)
        warnings += skipped
        keep = set(mf.categories(kept))
        rows = [r for r in rows if r.category in keep]
    for w in warnings:
        typer.echo(f"warning: prepare: {w}", err=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "warnings.json", warnings)
    mf.write_manifest(rows, out / "images.csv")
    classes = mf.classification_rows(rows, cfg.val_fraction, cfg.val_fraction, shots, seed)
    mf.write_manifest(classes, out / "classification.csv")
    final = mf.select_shots(kept, shots, seed) if anomaly else classes  # no anomaly task on an image folder
    mf.write_manifest(final, out / "manifest.csv")
    counts = {s: sum(r.split == s for r in final) for s in ("train", "val", "test")}
    typer.echo(f"manifest: {len(final)} images in {len(mf.categories(final))} categories, {counts}, "
               f"{sum(r.shot for r in final)} shots")


if __name__ == "__main__":
    run(app)
