"""DVC stage `demo_data`: generate the embedded MVTec-layout demo dataset (deterministic, offline)."""
from pathlib import Path

import typer

from anomaly_core.config import DemoConfig, build
from anomaly_core.data.demo import generate_demo
from stages.common import friendly_errors, get, load_config, run

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(out: Path = typer.Option(Path("data/demo"), help="output root (MVTec AD layout)"),
         config: Path = typer.Option(Path("data/config/demo_data.json"))) -> None:
    params = load_config(config)
    cfg = build(DemoConfig, get(params, "data.demo"), "data.demo")
    cats = generate_demo(out, seed=int(get(params, "demo_seed")), categories=None, n_train=cfg.n_train,
                         n_test_good=cfg.n_test_good, n_test_defect_per_type=cfg.n_test_defect_per_type, size=cfg.size)
    typer.echo(f"demo data: {len(cats)} categories in {out}: {', '.join(cats)}")


if __name__ == "__main__":
    run(app)
