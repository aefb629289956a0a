"""DVC stage `validate`: check params.yaml once, before any work, and write the params each stage reads.

Every params error is listed at once (missing keys, types, ranges, cross-key rules, unknown method names); the
backbones the selected methods need are resolved (names, configs, weight files) without being built.

Writes `data/config/<stage>.json` (see `anomaly_core/pipeline.py`); every other stage reads only its own file.
"""
from pathlib import Path

import typer

from anomaly_core.io import write_json
from anomaly_core.pipeline import check_params
from stages.common import friendly_errors, load_params, run

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(params_file: Path = typer.Option(Path("params.yaml"), "--params"),
         out: Path = typer.Option(Path("data/config"))) -> None:
    params = load_params(params_file)
    configs = check_params(params)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.json"):
        if stale.stem not in configs:
            stale.unlink()
    for name, cfg in configs.items():
        write_json(out / f"{name}.json", cfg, sort_keys=True)
    typer.echo(f"params valid; methods: {', '.join(configs['evaluate']['methods'])}; "
               f"feature branches: {', '.join(configs['features']['backbones']) or 'none'}")


if __name__ == "__main__":
    run(app)
