"""Training curves with dvclive: per-epoch histories -> `{dir}/metrics.json` (last value of every metric, for
`dvc exp show` / `dvc metrics`) and `{dir}/plots/metrics/<name>.tsv` (one row per epoch, for `dvc plots`).

dvclive runs inside a DVC stage here: `Live(dir, save_dvc_exp=False, dvcyaml=None)` neither creates an
experiment nor writes a dvc.yaml; the stage's dvc.yaml declares the files (see README "Training curves"):

    metrics:
      - metrics/train/aaclip_image/metrics.json:
          cache: false
    plots:
      - metrics/train/aaclip_image/plots/metrics:
          cache: false
          x: step

dvclive names the x column `step`; here step = the history's epoch (epoch 0 = the untrained model where the
history has it). Several histories (one per category: CoOp, VPT) go into one directory under
`<category>/<metric>` names. A stage without curves (skipped, or a training-free method) writes a header-only
`plots/metrics/no_curves.tsv`, so DVC finds the declared plots directory non-empty and stays quiet.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["log_history", "log_histories", "numeric_items"]

History = Sequence[Mapping[str, Any]]
NO_CURVES = "no_curves.tsv"  # the plots file of a stage without curves (skipped, or a method that does not train)


def numeric_items(row: Mapping[str, Any], skip: Sequence[str] = ()) -> list[tuple[str, float]]:
    """(key, float) for the finite numbers of a history row (bools, None, strings and `skip` keys dropped)."""
    out = []
    for k, v in row.items():
        if k in skip or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out.append((k, float(v)))
    return out


def log_histories(out_dir: str | Path, histories: Mapping[str, History], step_key: str = "epoch",
                  summary: Mapping[str, Any] | None = None) -> Path:
    """Log {prefix: history} with dvclive into `out_dir` (emptied first, as dvclive does without resume).

    history: per-epoch dicts with `step_key` (an int-valued number) and any numeric values; metric names are
    `{prefix}/{key}` (just `key` for prefix ""); metrics.json holds the last epoch's values. A row flagged
    `"selected": True` (the checkpoint kept) also adds `selected/epoch` and `selected/<key>` to metrics.json. `summary` ({name: number}) goes to metrics.json only (no plot). Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    if any(histories.values()) or summary:
        _log_with_dvclive(out_dir, histories, step_key, summary)
    else:  # nothing to log (a skipped stage, a training-free method): dvclive's files without its start-up
        _clear_like_dvclive(out_dir)
        (out_dir / "metrics.json").write_text("{}\n")
    plots = out_dir / "plots" / "metrics"
    plots.mkdir(parents=True, exist_ok=True)  # declared as a DVC plots dir, even without curves
    if not any(plots.iterdir()):  # DVC warns "'...' is empty" for an empty plots dir: a header-only table instead
        (plots / NO_CURVES).write_text("step\tno_curves\n")
    return out_dir


def _clear_like_dvclive(out_dir: Path) -> None:
    """What `Live(dir)` removes when it starts without resume: its plot folders, metrics / params / report files
    and any dvc.yaml in `out_dir` (`dvclive.Live._init_cleanup`)."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("sklearn", "metrics", "images", "custom"):
        shutil.rmtree(out_dir / "plots" / sub, ignore_errors=True)
    for name in ("metrics.json", "params.yaml", "report.html", "report.md"):
        (out_dir / name).unlink(missing_ok=True)
    for dvc_file in out_dir.glob("*dvc.yaml"):  # glob.glob("**dvc.yaml") without recursive: this folder
        dvc_file.unlink()


def _log_with_dvclive(out_dir: Path, histories: Mapping[str, History], step_key: str,
                      summary: Mapping[str, Any] | None) -> None:
    """The histories through dvclive (importing it opens the DVC repository: ~1-2 s of a stage's start-up)."""
    from dvclive import Live

    with Live(dir=str(out_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for prefix, history in histories.items():
            name = (lambda k: f"{prefix}/{k}") if prefix else (lambda k: k)
            for row in history:
                if step_key not in row:
                    raise ValueError(f"history row without {step_key!r}: {dict(row)}")
                live.step = int(row[step_key])
                for key, value in numeric_items(row, skip=(step_key,)):
                    live.log_metric(name(key), value)
                if row.get("selected") is True:  # the checkpoint kept: its epoch and values, metrics.json only
                    live.log_metric(name("selected/epoch"), int(row[step_key]), plot=False)
                    for key, value in numeric_items(row, skip=(step_key,)):
                        live.log_metric(name(f"selected/{key}"), value, plot=False)
        for key, value in (summary or {}).items():
            live.log_metric(key, value, plot=False)


def log_history(out_dir: str | Path, history: History, step_key: str = "epoch",
                summary: Mapping[str, Any] | None = None) -> Path:
    """One history (AA-CLIP stage 1 / stage 2) -> dvclive files in `out_dir`; see log_histories."""
    return log_histories(out_dir, {"": history}, step_key, summary)
