"""Experiment collection (`anomaly-core collect`): a `dvc exp run` sweep gathered into tables and a plot.

    anomaly-core collect --repo . --out sweeps --metric image_auroc --methods knn,fusion

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
from typing import Any, Iterable, Sequence

import numpy as np

from anomaly_core.errors import DataError
from anomaly_core.io import atomic_path, write_text

__all__ = ["METRIC_FILES", "dvc_command", "run_exp_show", "read_experiments", "parse_exp_show", "dedupe", "aggregate",
           "experiments_csv", "aggregate_csv", "plot_metric", "collect_sweep"]

METRIC_FILES = ("metrics/summary.json", "metrics/classification.json")
FINISHED = (None, "success")  # executor state of a finished experiment (null once it is no longer tracked)


# --------------------------------------------------------------------------- dvc exp show


def dvc_command() -> list[str]:
    exe = shutil.which("dvc")
    return [exe] if exe else [sys.executable, "-m", "dvc"]


def run_exp_show(repo: str | Path, all_commits: bool = False) -> list[dict]:
    """Parsed output of ``dvc exp show --json`` run in ``repo``; RuntimeError with DVC's message on failure."""
    cmd = dvc_command() + ["exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
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
            "seed": _param(data.get("params"), "seed"), "metrics": _method_metrics(data.get("metrics"), files),
            "other_params": _flat_params(data.get("params"))}


SWEPT = ("shots", "seed")


def _flat_params(params: dict | None) -> dict[str, Any]:
    """{"file:dotted.key": value} of every param except the swept ones (`shots`, `seed`)."""
    out: dict[str, Any] = {}

    def walk(tree: Any, prefix: str, file: str) -> None:
        if isinstance(tree, dict) and tree:
            for k, v in tree.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k), file)
        elif prefix not in SWEPT:
            out[f"{file}:{prefix}" if file != "params.yaml" else prefix] = tree
    for file, entry in (params or {}).items():
        walk((entry or {}).get("data") or {}, "", file)
    return out


def check_same_setup(rows: list[dict]) -> None:
    """DataError when the collected experiments differ in any param but `shots` / `seed`: a mean over seeds of
    different configurations would mix them. The message names the keys and two experiments that differ."""
    if not rows:
        return
    first = rows[0]
    diffs: dict[str, tuple[dict, Any, Any]] = {}
    for r in rows[1:]:
        a, b = first.get("other_params", {}), r.get("other_params", {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k) and k not in diffs:
                diffs[k] = (r, a.get(k), b.get(k))
    if diffs:
        shown = "; ".join(f"{k}: {v1!r} in {first['experiment']}, {v2!r} in {r['experiment']}"
                          for k, (r, v1, v2) in list(diffs.items())[:3])
        more = f" (and {len(diffs) - 3} more keys)" if len(diffs) > 3 else ""
        raise DataError(f"collect: the experiments differ in params other than shots/seed ({shown}{more}); a mean "
                        "over seeds would mix configurations: remove the other experiments (dvc exp remove) or "
                        "collect each configuration from its own commit")


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
    check_same_setup(rows)
    if methods:
        rows = [{**r, "metrics": {m: v for m, v in r["metrics"].items() if m in methods}} for r in rows]
    table = aggregate(rows)
    out = Path(out)
    write_text(out / "experiments.csv", experiments_csv(rows))
    write_text(out / "aggregate.csv", aggregate_csv(table))
    drawn = plot_metric(table, metric, out / f"{metric}_vs_shots.png", methods)
    return {"experiments": len(rows), "duplicates_dropped": dropped, "plotted_methods": drawn,
            "plot": str(out / f"{metric}_vs_shots.png")}


def dvc_output_containing(repo: str | Path, out: str | Path) -> tuple[str, str] | None:
    """(stage, output) of the `dvc.yaml` output of `repo` that `out` lies in (or holds), else None: `dvc repro`
    deletes and restores such a directory, so collect's tables there would vanish."""
    import yaml

    repo = Path(repo).resolve()
    spec = repo / "dvc.yaml"
    if not spec.is_file():
        return None
    target = Path(out).resolve()
    for stage, body in (yaml.safe_load(spec.read_text()) or {}).get("stages", {}).items():
        body = body.get("do", body) if isinstance(body, dict) else {}
        for entry in body.get("outs", []) or []:
            name = next(iter(entry)) if isinstance(entry, dict) else str(entry)
            if "${" in name:
                continue
            path = (repo / name).resolve()
            if target == path or path in target.parents or target in path.parents:
                return stage, name
    return None

