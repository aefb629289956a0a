"""`anomaly-core` command line (typer commands only; the work is in the library):

    anomaly-core collect --repo . --out sweeps --metric image_auroc   # anomaly_core/experiments.py
    anomaly-core sweep run --machine 0 --machines 2 --shots 1,2,5 --seeds 0,1,2 --git-remote origin   # sweep.py
    anomaly-core predict models/export images/ --out predictions           # deploy/predict.py
    anomaly-core export-onnx models/export                                   # deploy/onnx.py
    anomaly-core serve models/export --port 8000                             # deploy/serve.py
    anomaly-core review exp-a exp-b --out review-compare                     # review.py
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from anomaly_core.runtime import error_lines, progress_enabled, setup_environment

__all__ = ["app"]

# --------------------------------------------------------------------------- typer app


def _fail(exc: BaseException, code: int = 2) -> None:
    """The `error: ...` line(s) of an exception (the stages' printer, `runtime.error_lines`), then exit `code`."""
    for line in error_lines("", exc):
        typer.echo(line, err=True)
    raise typer.Exit(code)


app = typer.Typer(add_completion=False, help="anomaly_core tools (the pipeline itself runs with `dvc repro`).")


@app.callback()
def _root() -> None:
    """anomaly_core command line (a callback keeps `collect` a named sub-command)."""
    setup_environment()


@app.command()
def collect(repo: Path = typer.Option(Path("."), help="DVC repository whose experiments are collected"),
            out: Path = typer.Option(Path("sweeps"), help="output directory (relative to the current directory; "
                                                          "never inside a DVC output such as reports/)"),
            metric: str = typer.Option("image_auroc", help="metric plotted against shots"),
            methods: str = typer.Option("", help="comma-separated methods to keep (default: all)"),
            include_baseline: bool = typer.Option(False, help="also collect the baseline commit's results"),
            all_commits: bool = typer.Option(False, help="experiments of all commits, not only HEAD"),
            from_json: Optional[Path] = typer.Option(None, help="parse a saved `dvc exp show --json` file")) -> None:
    """Tabulate and plot a `dvc exp run -S shots=.. -S seed=..` sweep (mean ± std over seeds)."""
    from anomaly_core.errors import DataError
    from anomaly_core.experiments import collect_sweep, dvc_output_containing, read_experiments

    inside = dvc_output_containing(repo, out)
    if inside:
        typer.echo(f"error: --out {out}: inside {inside[1]}, an output of DVC stage {inside[0]} (dvc repro "
                   "deletes it); choose another --out, e.g. sweeps", err=True)
        raise typer.Exit(2)
    try:
        data = json.loads(from_json.read_text()) if from_json else read_experiments(repo, all_commits)
    except (RuntimeError, OSError, json.JSONDecodeError) as exc:
        _fail(exc)
    keep = [m.strip() for m in methods.split(",") if m.strip()] or None
    try:
        summary = collect_sweep(data, out, metric, keep, include_baseline)
    except DataError as exc:  # experiments of different configurations
        _fail(exc)
    if not summary["experiments"]:
        typer.echo("error: no finished experiment with metrics (run e.g. `dvc exp run -S shots=1 -S seed=0`)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{summary['experiments']} experiments ({summary['duplicates_dropped']} duplicate runs dropped) "
               f"-> {out}/experiments.csv, {out}/aggregate.csv, {summary['plot']}")
    if not summary["plotted_methods"]:
        typer.echo(f"warning: no method reports {metric}; the plot is empty", err=True)


sweep_app = typer.Typer(add_completion=False, help="Spread a shots x seeds sweep over machines sharing one Git "
                                                    "remote and one DVC remote.")
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("run")
def sweep_run(machine: int = typer.Option(0, help="this machine's index, 0-based"),
              machines: int = typer.Option(1, help="number of machines sharing the sweep"),
              shots: str = typer.Option("1,2,5", help="comma-separated shots values"),
              seeds: str = typer.Option("0,1,2", help="comma-separated seeds"),
              set_: list[str] = typer.Option([], "--set", help="extra key=value override for every point"),
              git_remote: str = typer.Option("", help="Git remote to push experiments to ('' = do not push)"),
              dvc_remote: str = typer.Option("", help="DVC remote (default: the repository's default remote)"),
              jobs: int = typer.Option(1, help="queue workers on this machine"),
              prefix: str = typer.Option("", help="prefix of the experiment names"),
              repo: Path = typer.Option(Path("."), help="the DVC repository (a clone on this machine)"),
              dry_run: bool = typer.Option(False, help="print the commands, run nothing")) -> None:
    """Queue and run this machine's slice of the grid, then `dvc exp push` + `dvc push` (run-cache included)."""
    from anomaly_core.sweep import csv_list, exp_name, machine_slice, run_commands, sweep_grid, sweep_run_commands

    try:
        points = machine_slice(sweep_grid(csv_list(shots), csv_list(seeds), set_), machine, machines)
    except ValueError as exc:
        _fail(exc)
    typer.echo(f"machine {machine}/{machines}: {len(points)} experiments: "
               + ", ".join(exp_name(p, prefix) for p in points))
    if points:
        try:
            run_commands(sweep_run_commands(points, git_remote or None, jobs, prefix, dvc_remote or None), repo,
                         dry_run, typer.echo)
        except RuntimeError as exc:
            _fail(exc, 1)


@sweep_app.command("pull")
def sweep_pull(git_remote: str = typer.Option("origin", help="Git remote the machines pushed to"),
               dvc_remote: str = typer.Option("", help="DVC remote (default: the repository's default remote)"),
               with_data: bool = typer.Option(False, help="also pull the experiments' cached outputs and run-cache"),
               repo: Path = typer.Option(Path("."), help="the DVC repository"),
               dry_run: bool = typer.Option(False, help="print the commands, run nothing")) -> None:
    """Fetch every machine's experiments of the current commit; then run `anomaly-core collect`."""
    from anomaly_core.sweep import run_commands, sweep_pull_commands

    try:
        run_commands(sweep_pull_commands(git_remote, with_data, dvc_remote or None), repo, dry_run, typer.echo)
    except RuntimeError as exc:
        _fail(exc, 1)

# --------------------------------------------------------------------------- use the exported model


@app.command()
def predict(model_dir: Path = typer.Argument(..., help="an exported bundle (models/export)"),
            inputs: list[Path] = typer.Argument(..., help="image files and/or directories (searched recursively)"),
            out: Path = typer.Option(Path("predictions"), help="output directory"),
            category: Optional[str] = typer.Option(None, help="the bundle category to score against "
                                                              "(needed when it has several)"),
            heatmaps: bool = typer.Option(False, help="also write an overlay PNG per image to OUT/heatmaps"),
            batch_size: int = typer.Option(16, help="images per forward pass (a transductive bundle, MuSc, scores "
                                                    "all the images of one call as one pool)"),
            engine: str = typer.Option("torch", help="torch | onnx (after `anomaly-core export-onnx`)"),
            resume: bool = typer.Option(False, help="keep OUT/predictions.csv and score only the images not in it "
                                                    "(after an interrupted run)"),
            pool_size: int = typer.Option(1000, help="most images a transductive (MuSc) bundle scores as one pool "
                                                     "(memory grows with its square)"),
            max_pixels: int = typer.Option(40_000_000, help="an image above this many pixels (read from its header) "
                                                            "gets an error row instead of being decoded"),
            workers: int = typer.Option(1, help="batches scored at once, one torch thread each (kNN bundles; 2 on "
                                                "2 cores is ~2x faster; scores then differ from workers 1 / serve "
                                                "by float rounding, < 1e-4)")) -> None:
    """Score images with an exported model: OUT/predictions.csv (path, category, score, is_anomalous, threshold,
    error), one row per image as it is scored. Needs only the bundle: no DVC repository, no dataset, no network."""
    from anomaly_core.deploy.predict import predict_files
    from anomaly_core.errors import DataError, WeightsError

    try:
        rows = predict_files(model_dir, inputs, out, category, heatmaps, batch_size, engine, progress=progress_enabled(),
                             resume=resume, pool_size=pool_size, max_pixels=max_pixels, workers=workers)
    except (DataError, WeightsError, ImportError) as exc:
        _fail(exc)
    failed = [r for r in rows if r["error"]]
    for r in failed:
        typer.echo(f"error: {r['path']}: {r['error']}", err=True)
    flagged = sum(1 for r in rows if r["is_anomalous"] == 1)
    typer.echo(f"{len(rows) - len(failed)} images scored ({flagged} anomalous), {len(failed)} unreadable "
               f"-> {out / 'predictions.csv'}")


@app.command("export-onnx")
def export_onnx(model_dir: Path = typer.Argument(..., help="an exported kNN bundle (models/export)"),
                check: bool = typer.Option(True, help="compare onnxruntime with the PyTorch engine on a random image")) -> None:
    """Write MODEL_DIR/model.onnx: image tensor -> (image score, anomaly map), the memory bank inside; one graph
    per category (model_<category>.onnx)."""
    from anomaly_core.errors import DataError

    try:
        from anomaly_core.deploy.onnx import export_bundle
    except ImportError as exc:
        _fail(ImportError(f"{exc}; install the extra: pip install 'anomaly_core[onnx]'"))
    try:
        for line in export_bundle(model_dir, check=check):
            typer.echo(line)
    except (DataError, ImportError) as exc:
        _fail(exc)


@app.command()
def serve(model_dir: Path = typer.Argument(..., help="an exported bundle (models/export)"),
          host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default; see README: reverse proxy)"),
          port: int = typer.Option(8000, help="TCP port"),
          token_file: Optional[Path] = typer.Option(None, help="file holding a bearer token every request but "
                                                               "/health must send (Authorization: Bearer ...)"),
          max_bytes: int = typer.Option(20_000_000, help="largest accepted upload per image, bytes"),
          max_pixels: int = typer.Option(40_000_000, help="largest accepted image, width x height"),
          max_images: int = typer.Option(32, help="most images per request"),
          batch_wait_ms: float = typer.Option(5.0, help="micro-batching window: concurrent requests arriving in it "
                                                        "share one forward pass"),
          max_batch: int = typer.Option(16, help="most images per forward pass"),
          max_inflight: int = typer.Option(64, help="requests read and scored at once (bounds memory)"),
          review: Optional[Path] = typer.Option(None, help="the review page folder served at /review/ and shown on / "
                                                           "(default: reports/review when it exists)"),
          trim_idle_s: float = typer.Option(1.0, help="after this many seconds without a request, return freed "
                                                      "memory to the OS (glibc malloc_trim; 0 = never)")) -> None:
    """Serve a bundle over HTTP: POST /predict, GET /health, GET /model, POST /reload, GET / (upload form + review)."""
    import logging

    from anomaly_core.errors import DataError, WeightsError

    try:
        from anomaly_core.deploy.serve import ServeConfig, create_app
        import uvicorn
    except ImportError as exc:
        _fail(ImportError(f"{exc}; install the extra: pip install 'anomaly_core[serve]'"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = None
        if token_file is not None:
            if not token_file.is_file():
                raise DataError(f"--token-file {token_file}: no such file")
            token = token_file.read_text().strip()
            if not token:
                raise DataError(f"--token-file {token_file}: empty")
        if review is None and (Path("reports/review") / "index.html").is_file():
            review = Path("reports/review")
        cfg = ServeConfig(max_bytes, max_pixels, max_images, batch_wait_ms, max_batch, max_inflight, token, review,
                          trim_idle_s=trim_idle_s)
        app_ = create_app(model_dir, cfg)
    except (DataError, WeightsError) as exc:
        _fail(exc)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        typer.echo(f"warning: serving on {host} without --token-file: anyone who reaches it can score and reload",
                   err=True)
    uvicorn.run(app_, host=host, port=port, log_level="info", access_log=False)


@app.command()
def review(exp_a: str = typer.Argument(..., help="a `dvc exp` name, a git revision, or a folder holding verdicts.json"),
           exp_b: str = typer.Argument(..., help="the same for the other experiment"),
           out: Path = typer.Option(Path("review-compare"), help="output directory (its index.html is the page)"),
           repo: Path = typer.Option(Path("."), help="the DVC repository the experiments belong to")) -> None:
    """One page showing where two experiments' verdicts differ (their evaluate stages' reports/review/verdicts.json)."""
    from anomaly_core.errors import DataError
    from anomaly_core.review import load_verdicts, write_compare

    try:
        a, b = load_verdicts(exp_a, repo), load_verdicts(exp_b, repo)
        diff = write_compare(a, b, out)
    except (DataError, OSError, ValueError) as exc:
        _fail(exc)
    for m, parts in diff["methods"].items():
        n = sum(len(p["differ"]) for p in parts.values())
        typer.echo(f"{m:>16}: {n} of {sum(p['compared'] for p in parts.values())} verdicts differ")
    typer.echo(f"wrote {out / 'index.html'}")


if __name__ == "__main__":
    app()
