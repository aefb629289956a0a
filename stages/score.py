"""DVC stage `score@<method>`: image scores and pixel maps of one method for the val and test images.

Writes `data/scores/<method>/{val,test}.safetensors`.
"""
from pathlib import Path

import typer

from anomaly_core.data import manifest as mf
from anomaly_core.methods import get_method
from anomaly_core.methods.base import context_for, states_path
from anomaly_core.store import FeatureStore, save_scores
from stages.common import device, friendly_errors, get, load_config, progress, run, seed_everything, skip_unless_anomaly

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(method: str = typer.Option(...),
         config: Path = typer.Option(...),
         manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         features: Path = typer.Option(Path("data/features")),
         models: Path = typer.Option(..., help="data/models/<method>"),
         out: Path = typer.Option(..., help="data/scores/<method>")) -> None:
    params = load_config(config)
    if skip_unless_anomaly(params, dirs=(out,)):
        return
    m = get_method(method)
    seed_everything(int(get(params, "seed")))
    rows = mf.read_manifest(manifest)
    ctx = context_for(m, params, rows, FeatureStore(features), models, progress(), device())
    states = {c: m.load(states_path(models, c), ctx) for c in mf.categories(rows)} if m.fit is not None else {}
    for split, per_cat in m.score(ctx, states).items():
        save_scores(out / f"{split}.safetensors", per_cat, what=f"score@{method} ({split})")
    typer.echo(f"scored {method}")


if __name__ == "__main__":
    run(app)
