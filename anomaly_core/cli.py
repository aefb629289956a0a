"""`anomaly-core` command line: `collect` gathers a `dvc exp run` sweep into tables and a plot; `sweep` runs
one machine's slice of a shots x seeds grid and shares it through the Git and DVC remotes.

    anomaly-core collect --repo . --out reports/sweep --metric image_auroc --methods knn,fusion
    anomaly-core sweep run --machine 0 --machines 2 --shots 1,2,5 --seeds 0,1,2 --git-remote origin
    anomaly-core sweep pull --git-remote origin

`collect` reads the experiments of ``--repo`` through DVC's Python API (``Repo.experiments.show``, the data
behind ``dvc exp show --json``; `dvc.api.exp_show` flattens params and metrics into one namespace, where
params.yaml's `knn.k` and summary.json's `knn.image_auroc` cannot be told apart, and turns ints into floats
and timestamps into "12:56 AM", so it does not give what collect needs), keeps the finished experiments (queued, running and failed ones are
dropped), reads their params ``shots`` and ``seed`` and the metrics of ``metrics/summary.json`` (and
``metrics/classification.json`` when present), and writes

- ``experiments.csv``: one row per experiment, one column per ``{method}.{metric}``;
- ``aggregate.csv``: per shots value, method and metric: mean and sample std (ddof=1; 0 for one seed) over seeds;
- ``{metric}_vs_shots.png``: mean ± std error bars against shots, one line per method.

The DVC 3.x JSON (checked with dvc 3.67) is a list of baselines::

    [{"rev": "workspace" | <sha>, "name": <branch> | null, "error": null,
      "data": {"rev", "timestamp", "params": {"params.yaml": {"data": {...}}},
               "metrics": {"metrics/summary.json": {"data": {...}} | {"error": {...}}}, "deps", "outs", "meta"},
      "experiments": null | [{"name": <exp>, "executor": null | {"state": "queued|running|failed|success", ...},
                              "revs": [{"rev", "name", "error": null | {"msg", "type"}, "data": {...},
                                        "experiments": null}]}]}]
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import typer

from anomaly_core.io import atomic_path, write_text

__all__ = ["METRIC_FILES", "run_exp_show", "read_experiments", "parse_exp_show", "sweep_grid", "machine_slice",
           "exp_name", "sweep_run_commands", "sweep_pull_commands", "dedupe", "aggregate", "experiments_csv",
           "aggregate_csv", "plot_metric", "collect_sweep", "app"]

METRIC_FILES = ("metrics/summary.json", "metrics/classification.json")
FINISHED = (None, "success")  # executor state of a finished experiment (null once it is no longer tracked)


# --------------------------------------------------------------------------- dvc exp show


def _dvc_command() -> list[str]:
    exe = shutil.which("dvc")
    return [exe] if exe else [sys.executable, "-m", "dvc"]


def run_exp_show(repo: str | Path, all_commits: bool = False) -> list[dict]:
    """Parsed output of ``dvc exp show --json`` run in ``repo``; RuntimeError with DVC's message on failure."""
    cmd = _dvc_command() + ["exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[-3:])}` failed in {repo}: {proc.stderr.strip() or proc.stdout.strip()}")
    return json.loads(proc.stdout)


def _json_default(obj: Any) -> Any:
    """As `dvc exp show --json`: dates in ISO format, exceptions as {type, msg}."""
    from datetime import date, datetime

    if isinstance(obj, (date, datetime)):
        return obj.isoformat()
    return {"type": type(obj).__name__, "msg": str(obj)}


def read_experiments(repo: str | Path, all_commits: bool = False) -> list[dict]:
    """The experiments of ``repo`` in the `dvc exp show --json` layout, read in-process with DVC's Python API;
    RuntimeError with DVC's message when ``repo`` is not a DVC repository (or DVC fails)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo.open(str(repo)) as dvc_repo:
            exps = dvc_repo.experiments.show(all_commits=all_commits)
            return json.loads(json.dumps([e.dumpd() for e in exps], default=_json_default))
    except DvcException as exc:
        raise RuntimeError(f"reading the experiments of {repo} failed: {exc}") from exc


def _lookup(tree: Any, dotted: str) -> Any:
    """tree['a']['b'] for 'a.b', or None."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _param(params: dict, key: str) -> Any:
    """``key`` from params.yaml first, then from any other params file; None when absent."""
    files = sorted(params or {}, key=lambda f: f != "params.yaml")
    for f in files:
        value = _lookup((params[f] or {}).get("data"), key)
        if value is not None:
            return value
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _method_metrics(metrics: dict, files: Sequence[str]) -> dict[str, dict[str, float]]:
    """{method: {metric: value}} merged from the metrics files named ``files``; `_`-keys and non-numbers dropped."""
    out: dict[str, dict[str, float]] = {}
    for path, entry in (metrics or {}).items():
        if not any(path == f or path.endswith("/" + f) for f in files):
            continue
        for method, values in ((entry or {}).get("data") or {}).items():
            if method.startswith("_") or not isinstance(values, dict):
                continue
            out.setdefault(method, {}).update({k: float(v) for k, v in values.items() if _is_number(v)})
    return out


def _row(rev: dict, name: str, baseline: str, kind: str, files: Sequence[str]) -> dict:
    """One collected experiment from a DVC rev entry."""
    data = rev.get("data") or {}
    return {"experiment": name, "rev": rev.get("rev", ""), "baseline": baseline, "kind": kind,
            "timestamp": data.get("timestamp") or "", "shots": _param(data.get("params"), "shots"),
            "seed": _param(data.get("params"), "seed"), "metrics": _method_metrics(data.get("metrics"), files)}


def _finished(exp: dict) -> dict | None:
    """The rev entry of a finished, successful experiment, else None."""
    state = (exp.get("executor") or {}).get("state")
    revs = exp.get("revs") or []
    if state not in FINISHED or not revs:
        return None
    rev = revs[0]
    return rev if rev.get("error") is None and rev.get("data") else None


def parse_exp_show(data: list[dict], include_baseline: bool = False, files: Sequence[str] = METRIC_FILES) -> list[dict]:
    """Rows ``{experiment, rev, baseline, kind, timestamp, shots, seed, metrics: {method: {metric: value}}}``.

    Keeps finished experiments (executor null or ``success``, no error); the workspace entry is never kept, the
    baseline commits only with ``include_baseline``. Rows without any metric are dropped.
    """
    rows = []
    for base in data:
        if base.get("rev") == "workspace":
            continue
        base_name = base.get("name") or str(base.get("rev", ""))[:7]
        if include_baseline and base.get("error") is None and base.get("data"):
            rows.append(_row(base, base_name, base_name, "baseline", files))
        for exp in base.get("experiments") or []:
            rev = _finished(exp)
            if rev is not None:
                rows.append(_row(rev, exp.get("name") or rev.get("name") or rev["rev"][:7], base_name, "experiment",
                                 files))
    return [r for r in rows if r["metrics"]]


def dedupe(rows: list[dict]) -> tuple[list[dict], int]:
    """One row per (shots, seed): the newest (timestamp) wins, so re-runs do not shrink the std. (rows, n dropped)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (str(r["shots"]), str(r["seed"]))
        if key not in best or r["timestamp"] > best[key]["timestamp"]:
            best[key] = r
    kept = [r for r in rows if best[(str(r["shots"]), str(r["seed"]))] is r]
    return kept, len(rows) - len(kept)


# --------------------------------------------------------------------------- aggregation


def shots_key(shots: Any) -> tuple:
    """Sort key: integer shots ascending, then other values (e.g. 'all', missing) by name."""
    if isinstance(shots, (int, float)) and not isinstance(shots, bool):
        return (0, float(shots), "")
    return (1, 0.0, str(shots))


def aggregate(rows: Iterable[dict]) -> list[dict]:
    """Mean and sample std (ddof=1; 0.0 for a single seed) over seeds, per (shots, method, metric).

    rows: ``{"shots", "seed", "metrics": {method: {metric: value}}}``. Returns rows
    ``{shots, method, metric, mean, std, n, seeds}`` sorted by shots, method, metric.
    """
    groups: dict[tuple, list[tuple[Any, float]]] = defaultdict(list)
    shots_of: dict[str, Any] = {}
    for r in rows:
        shots_of[str(r["shots"])] = r["shots"]
        for method, values in r["metrics"].items():
            for metric, v in values.items():
                groups[(str(r["shots"]), method, metric)].append((r["seed"], float(v)))
    table = []
    for (shots, method, metric), items in groups.items():
        v = np.array([x for _, x in items], dtype=np.float64)
        table.append({"shots": shots_of[shots], "method": method, "metric": metric, "mean": float(v.mean()),
                      "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                      "seeds": " ".join(str(s) for s, _ in sorted(items, key=lambda t: str(t[0])))})
    return sorted(table, key=lambda t: (shots_key(t["shots"]), t["method"], t["metric"]))


# --------------------------------------------------------------------------- outputs


def _csv_text(columns: list[str], records: Iterable[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in columns})
    return buf.getvalue()


def experiments_csv(rows: list[dict]) -> str:
    """Wide CSV: experiment, rev, baseline, kind, timestamp, shots, seed, then one ``method.metric`` column each."""
    cols = sorted({f"{m}.{k}" for r in rows for m, vals in r["metrics"].items() for k in vals})
    flat = [{**{k: r[k] for k in ("experiment", "rev", "baseline", "kind", "timestamp", "shots", "seed")},
             **{f"{m}.{k}": v for m, vals in r["metrics"].items() for k, v in vals.items()}}
            for r in sorted(rows, key=lambda r: (shots_key(r["shots"]), str(r["seed"]), r["experiment"]))]
    return _csv_text(["experiment", "rev", "baseline", "kind", "timestamp", "shots", "seed"] + cols, flat)


def aggregate_csv(table: list[dict]) -> str:
    """Long CSV: shots, method, metric, mean, std (6 decimals), n, seeds."""
    rounded = [{**t, "mean": round(t["mean"], 6), "std": round(t["std"], 6)} for t in table]
    return _csv_text(["shots", "method", "metric", "mean", "std", "n", "seeds"], rounded)


def plot_metric(table: list[dict], metric: str, path: str | Path, methods: Sequence[str] | None = None) -> list[str]:
    """PNG of ``metric`` (mean ± std over seeds) against shots, one line per method; returns the methods drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sel = [t for t in table if t["metric"] == metric and (not methods or t["method"] in methods)]
    shots = sorted({str(t["shots"]): t["shots"] for t in sel}.values(), key=shots_key)
    pos = {str(s): i for i, s in enumerate(shots)}  # categorical x: 1, 2, 5, 10, all are evenly spaced
    drawn = sorted({t["method"] for t in sel}, key=lambda m: list(methods).index(m) if methods else m)
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method in drawn:
        pts = sorted((t for t in sel if t["method"] == method), key=lambda t: shots_key(t["shots"]))
        ax.errorbar([pos[str(t["shots"])] for t in pts], [t["mean"] for t in pts], yerr=[t["std"] for t in pts],
                    marker="o", capsize=3, label=method)
    ax.set_xticks(range(len(shots)), [str(s) for s in shots])
    ax.set_xlabel("shots (k training images per category or class)")
    ax.set_ylabel(f"{metric} (test)")
    ax.set_title(f"{metric} vs shots: mean ± std over seeds")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return drawn


def collect_sweep(data: list[dict], out: str | Path, metric: str = "image_auroc",
                  methods: Sequence[str] | None = None, include_baseline: bool = False) -> dict:
    """Parse ``dvc exp show --json`` data and write the two CSVs and the plot under ``out``; returns a summary."""
    rows, dropped = dedupe(parse_exp_show(data, include_baseline))
    if methods:
        rows = [{**r, "metrics": {m: v for m, v in r["metrics"].items() if m in methods}} for r in rows]
    table = aggregate(rows)
    out = Path(out)
    write_text(out / "experiments.csv", experiments_csv(rows))
    write_text(out / "aggregate.csv", aggregate_csv(table))
    drawn = plot_metric(table, metric, out / f"{metric}_vs_shots.png", methods)
    return {"experiments": len(rows), "duplicates_dropped": dropped, "plotted_methods": drawn,
            "plot": str(out / f"{metric}_vs_shots.png")}


# --------------------------------------------------------------------------- sweeps over several machines


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def sweep_grid(shots: Sequence[str], seeds: Sequence[str], sets: Sequence[str] = ()) -> list[dict[str, str]]:
    """The shots x seeds grid (shots outer, seeds inner, as given) as `-S` overrides {key: value}; `sets`
    ("key=value") are added to every point. ValueError on an empty axis or a malformed set."""
    if not shots or not seeds:
        raise ValueError("the grid needs at least one shots value and one seed")
    extra = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        extra[key] = value
    return [{"shots": str(k), "seed": str(s), **extra} for k in shots for s in seeds]


def machine_slice(grid: Sequence[dict], machine: int, machines: int) -> list[dict]:
    """Points machine `machine` (0-based) of `machines` runs: every machines-th point, so the slices are
    disjoint and cover the grid."""
    if machines < 1 or not 0 <= machine < machines:
        raise ValueError(f"--machine {machine} --machines {machines}: need 0 <= machine < machines")
    return list(grid[machine::machines])


def exp_name(point: dict[str, str], prefix: str = "") -> str:
    """Experiment name of a grid point, e.g. `s5-seed1` (a valid Git ref name, unique within the grid)."""
    return f"{prefix}s{point['shots']}-seed{point['seed']}"


def sweep_run_commands(points: Sequence[dict], git_remote: str | None, jobs: int = 1, prefix: str = "",
                       dvc_remote: str | None = None) -> list[list[str]]:
    """DVC commands that queue `points`, run the queue (waits), and when `git_remote` is given push the
    experiments (Git refs + their DVC cache + run-cache) and the run-cache of the workspace to the remotes."""
    dvc = _dvc_command()
    cmds = []
    for p in points:
        cmds.append(dvc + ["exp", "run", "--queue", "-n", exp_name(p, prefix)]
                    + [a for k, v in p.items() for a in ("-S", f"{k}={v}")])
    cmds.append(dvc + ["exp", "run", "--run-all", "--jobs", str(jobs)])
    if git_remote:
        remote = ["-r", dvc_remote] if dvc_remote else []
        cmds.append(dvc + ["exp", "push", "--run-cache", *remote, git_remote] + [exp_name(p, prefix) for p in points])
        cmds.append(dvc + ["push", "--run-cache", *remote])
    return cmds


def sweep_pull_commands(git_remote: str, with_data: bool = False, dvc_remote: str | None = None) -> list[list[str]]:
    """DVC commands that fetch every experiment of the current commit from `git_remote` (their metrics live in
    the experiment commits, enough for `collect`), and with `with_data` the cached outputs + run-cache too."""
    dvc = _dvc_command()
    remote = ["-r", dvc_remote] if dvc_remote else []
    cmds = [dvc + ["exp", "pull", "--no-cache", git_remote]] if not with_data else [
        dvc + ["exp", "pull", "--run-cache", *remote, git_remote], dvc + ["pull", "--run-cache", *remote]]
    return cmds


def _run_all(cmds: list[list[str]], cwd: Path, dry_run: bool) -> None:
    for cmd in cmds:
        shown = " ".join(["dvc"] + cmd[len(_dvc_command()):])
        typer.echo(f"$ {shown}")
        if dry_run:
            continue
        proc = subprocess.run(cmd, cwd=cwd)
        if proc.returncode != 0:
            typer.echo(f"error: `{shown}` failed (exit {proc.returncode})", err=True)
            raise typer.Exit(proc.returncode)


# --------------------------------------------------------------------------- typer app


app = typer.Typer(add_completion=False, help="anomaly_core tools (the pipeline itself runs with `dvc repro`).")


@app.callback()
def _root() -> None:
    """anomaly_core command line (a callback keeps `collect` a named sub-command)."""


@app.command()
def collect(repo: Path = typer.Option(Path("."), help="DVC repository whose experiments are collected"),
            out: Path = typer.Option(Path("reports/sweep"), help="output directory"),
            metric: str = typer.Option("image_auroc", help="metric plotted against shots"),
            methods: str = typer.Option("", help="comma-separated methods to keep (default: all)"),
            include_baseline: bool = typer.Option(False, help="also collect the baseline commit's results"),
            all_commits: bool = typer.Option(False, help="experiments of all commits, not only HEAD"),
            from_json: Optional[Path] = typer.Option(None, help="parse a saved `dvc exp show --json` file")) -> None:
    """Tabulate and plot a `dvc exp run -S shots=.. -S seed=..` sweep (mean ± std over seeds)."""
    try:
        data = json.loads(from_json.read_text()) if from_json else read_experiments(repo, all_commits)
    except (RuntimeError, OSError, json.JSONDecodeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    keep = [m.strip() for m in methods.split(",") if m.strip()] or None
    summary = collect_sweep(data, out, metric, keep, include_baseline)
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
    try:
        points = machine_slice(sweep_grid(_csv_list(shots), _csv_list(seeds), set_), machine, machines)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"machine {machine}/{machines}: {len(points)} experiments: "
               + ", ".join(exp_name(p, prefix) for p in points))
    if points:
        _run_all(sweep_run_commands(points, git_remote or None, jobs, prefix, dvc_remote or None), repo, dry_run)


@sweep_app.command("pull")
def sweep_pull(git_remote: str = typer.Option("origin", help="Git remote the machines pushed to"),
               dvc_remote: str = typer.Option("", help="DVC remote (default: the repository's default remote)"),
               with_data: bool = typer.Option(False, help="also pull the experiments' cached outputs and run-cache"),
               repo: Path = typer.Option(Path("."), help="the DVC repository"),
               dry_run: bool = typer.Option(False, help="print the commands, run nothing")) -> None:
    """Fetch every machine's experiments of the current commit; then run `anomaly-core collect`."""
    _run_all(sweep_pull_commands(git_remote, with_data, dvc_remote or None), repo, dry_run)

# --------------------------------------------------------------------------- use the exported model (issue 10)


def _deploy_error(exc: Exception) -> None:
    """One `error:` line for a library error of predict / export-onnx, exit code 2."""
    typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
    raise typer.Exit(2)


@app.command()
def predict(model_dir: Path = typer.Argument(..., help="an exported bundle (models/export)"),
            inputs: list[Path] = typer.Argument(..., help="image files and/or directories (searched recursively)"),
            out: Path = typer.Option(Path("predictions"), help="output directory"),
            category: Optional[str] = typer.Option(None, help="the bundle category to score against "
                                                              "(needed when it has several)"),
            heatmaps: bool = typer.Option(False, help="also write an overlay PNG per image to OUT/heatmaps"),
            batch_size: int = typer.Option(16, help="images per forward pass (a transductive bundle, MuSc, scores "
                                                    "all the images of one call as one pool)"),
            engine: str = typer.Option("torch", help="torch | onnx (after `anomaly-core export-onnx`)")) -> None:
    """Score images with an exported model: OUT/predictions.csv (path, category, score, is_anomalous, threshold,
    error). Needs only the bundle: no DVC repository, no dataset, no network."""
    import os

    from anomaly_core.deploy.predict import predict_files
    from anomaly_core.errors import DataError, WeightsError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        rows = predict_files(model_dir, inputs, out, category, heatmaps, batch_size, engine,
                             progress=os.environ.get("ANOMALY_CORE_PROGRESS", "1") != "0")
    except (DataError, WeightsError, ImportError) as exc:
        _deploy_error(exc)
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
        _deploy_error(ImportError(f"{exc}; install the extra: pip install 'anomaly_core[onnx]'"))
    try:
        for line in export_bundle(model_dir, check=check):
            typer.echo(line)
    except (DataError, ImportError) as exc:
        _deploy_error(exc)


if __name__ == "__main__":
    app()
