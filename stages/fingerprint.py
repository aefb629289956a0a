"""DVC stage `fingerprint` (always run): hash the files the numbers come from that params name rather than dvc.yaml.

Writes `data/fingerprint/dataset.json` (the images and masks of `data.root` that `prepare` reads), `train_data.json`
(`aaclip.train_data.root`) and `weights_<branch>.json` (a local `backbones.<branch>.pretrained` file). Each is
byte-identical while its files are, so DVC re-runs only the stages that depend on a source whose content changed.
Files whose stat key is unchanged since the last run are not read again (cache in `.dvc/tmp`, outside every output).
"""
import time
from pathlib import Path

import typer

from anomaly_core.config import DataConfig, build
from anomaly_core.fingerprint import (
    StatCache,
    dataset_fingerprint,
    train_data_fingerprint,
    weights_fingerprint,
)
from anomaly_core.io import write_json
from stages.common import friendly_errors, get, load_config, run

app = typer.Typer(add_completion=False)
BRANCHES = ("visual", "clip")


def _describe(fp: dict) -> str:
    if "unreadable" in fp:
        return "not readable (prepare reports why)"
    if "categories" not in fp:
        return fp.get("tracked_by", "none")
    cats = fp["categories"]
    return (f"{fp['root']}: {len(cats)} categories, {sum(c['files'] for c in cats.values())} files, "
            f"{sum(c['bytes'] for c in cats.values()) / 1e6:.1f} MB")


@app.command()
@friendly_errors
def main(config: Path = typer.Option(Path("data/config/fingerprint.json")),
         out: Path = typer.Option(Path("data/fingerprint")),
         stat_cache: Path = typer.Option(Path(".dvc/tmp/anomaly_core_fingerprint.json"))) -> None:
    start = time.perf_counter()
    params = load_config(config)
    cache = StatCache.load(stat_cache)
    data = build(DataConfig, get(params, "data"), "data", strict=True)
    results = {"dataset": dataset_fingerprint(data, int(get(params, "seed")), cache),
               "train_data": train_data_fingerprint(get(params, "aaclip.train_data"), cache)}
    for branch in BRANCHES:
        results[f"weights_{branch}"] = weights_fingerprint(get(params, "backbones").get(branch), cache)
    out.mkdir(parents=True, exist_ok=True)
    for name, fp in results.items():
        write_json(out / f"{name}.json", fp)
    cache.save()
    typer.echo(f"fingerprint: dataset ({data.format}) {_describe(results['dataset'])}; "
               f"aaclip.train_data {_describe(results['train_data'])}; {len(cache.new)} files, "
               f"{len(cache.hashed)} read in full, {len(cache.changed)} changed since the last run, "
               f"{time.perf_counter() - start:.2f}s")
    for path in cache.changed[:10]:
        typer.echo(f"  changed: {path}")
    if len(cache.changed) > 10:
        typer.echo(f"  ... and {len(cache.changed) - 10} more")


if __name__ == "__main__":
    run(app)
