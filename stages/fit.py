"""DVC stage `fit@<method>`: fit one method on the train shots (and val anomalies) and save its state.

Writes `data/models/<method>/state/<category>.pt`, `metrics/fit/<method>.json` (training report) and its training
curves with dvclive in `metrics/train/<method>/` (empty for a method without curves). A method
without a fit (training-free, or trained by its own stages like AA-CLIP) leaves a marked, empty state.
"""
from pathlib import Path

import typer

from anomaly_core.tracking import log_histories
from stages.common import (
    device,
    friendly_errors,
    get,
    load_config,
    progress,
    run,
    seed_everything,
    skip_outputs,
    skip_unless_anomaly,
)

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(method: str = typer.Option(...),
         config: Path = typer.Option(...),
         manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         features: Path = typer.Option(Path("data/features")),
         models: Path = typer.Option(..., help="data/models/<method>"),
         report: Path = typer.Option(..., help="metrics/fit/<method>.json"),
         curves: Path = typer.Option(..., help="metrics/train/<method> (dvclive)")) -> None:
    params = load_config(config)
    state = models / "state"
    if skip_unless_anomaly(params, files=(report,), dirs=(state,)):
        return log_histories(curves, {})
    if params.get("skip"):  # a method without a fit: marked outputs, no torch start-up
        skip_outputs(params["skip"], files=(report,), dirs=(state,))
        return log_histories(curves, {})
    from anomaly_core.data import manifest as mf
    from anomaly_core.io import jsonable, write_json
    from anomaly_core.methods import get_method
    from anomaly_core.methods.base import context_for, states_path
    from anomaly_core.store import FeatureStore, check_finite_state

    m = get_method(method)
    seed_everything(int(get(params, "seed")))
    rows = mf.read_manifest(manifest)
    ctx = context_for(m, params, rows, FeatureStore(features), models, progress(), device())
    states, fit_report = m.fit(ctx)
    for cat, st in states.items():
        check_finite_state(st, f"fit@{method} category {cat}")
    for cat, st in states.items():
        m.save(states_path(models, cat), st, ctx)
    write_json(report, jsonable(fit_report))
    histories, summary = m.curves(fit_report) if m.curves else ({}, {})
    log_histories(curves, histories, summary=summary)
    typer.echo(f"fit {method}: {len(states)} categories")


if __name__ == "__main__":
    run(app)
