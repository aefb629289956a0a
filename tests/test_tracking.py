"""dvclive training curves: the files dvclive writes hold the history's values, and the dvc.yaml entries
documented for the training stages make `dvc exp show` list the metrics and `dvc plots show` render the curves."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly_core.methods.prompt_clip.coop import coop_histories
from anomaly_core.tracking import log_histories, log_history

ROOT = Path(__file__).resolve().parents[1]

IMAGE_HISTORY = [  # as train_image_adapters returns it: epoch 0 = untrained (val only), a None AUROC, a selection
    {"epoch": 0, "val_loss": 8.5, "val_pixel_auroc": None},
    {"epoch": 1, "loss": 5.25, "cls": 0.75, "seg": 4.5, "lr": 0.0005, "val_loss": 5.0, "val_pixel_auroc": 0.625,
     "selected": True},
    {"epoch": 2, "loss": 4.5, "cls": 0.5, "seg": 4.0, "lr": 0.00025, "val_loss": 4.75, "val_pixel_auroc": 0.5},
]


def _tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_log_history_files_hold_the_values(tmp_path):
    out = log_history(tmp_path / "live", IMAGE_HISTORY)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["loss"] == 4.5 and summary["val_pixel_auroc"] == 0.5 and summary["lr"] == 0.00025
    assert summary["step"] == 2
    assert summary["selected"] == {"epoch": 1, "loss": 5.25, "cls": 0.75, "seg": 4.5, "lr": 0.0005,
                                   "val_loss": 5.0, "val_pixel_auroc": 0.625}
    plots = out / "plots" / "metrics"
    assert sorted(p.name for p in plots.iterdir()) == sorted(
        f"{k}.tsv" for k in ("loss", "cls", "seg", "lr", "val_loss", "val_pixel_auroc"))
    assert [(r["step"], float(r["val_loss"])) for r in _tsv(plots / "val_loss.tsv")] == [("0", 8.5), ("1", 5.0),
                                                                                           ("2", 4.75)]
    assert [(r["step"], float(r["val_pixel_auroc"])) for r in _tsv(plots / "val_pixel_auroc.tsv")] == [
        ("1", 0.625), ("2", 0.5)]  # the None of epoch 0 is not logged
    # logging again replaces the previous run's files (no stale rows)
    log_history(out, IMAGE_HISTORY[:2])
    assert len(_tsv(plots / "val_loss.tsv")) == 2 and not (plots / "lr.tsv").read_text().count("0.00025")


def test_coop_report_per_category(tmp_path):
    report = {"brick": {"history": {"loss": [1.5, 1.25, 1.0], "criterion_value": [2.0, 1.75, 1.875],
                                    "criterion": "holdout_loss", "best_epoch": 2, "best_value": 1.75},
                        "split": {"train_normal": 3}},
              "grass": {"history": {"loss": [0.5], "criterion_value": [0.25], "criterion": "holdout_loss",
                                    "best_epoch": 1, "best_value": 0.25}}}
    rows, summary = coop_histories(report)
    assert rows["brick"][1] == {"epoch": 2, "loss": 1.25, "holdout_loss": 1.75}
    assert summary == {"brick/best_epoch": 2, "brick/best_value": 1.75, "grass/best_epoch": 1, "grass/best_value": 0.25}
    out = log_histories(tmp_path / "live", rows, summary=summary)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["brick"] == {"loss": 1.0, "holdout_loss": 1.875, "best_epoch": 2, "best_value": 1.75}
    assert [float(r["loss"]) for r in _tsv(out / "plots/metrics/brick/loss.tsv")] == [1.5, 1.25, 1.0]
    assert [r["step"] for r in _tsv(out / "plots/metrics/grass/holdout_loss.tsv")] == ["1"]


STAGE = """import json, sys
from anomaly_core.tracking import log_history, log_histories
h = json.load(open("history.json"))
log_history("metrics/train/aaclip_text", [{"epoch": r["epoch"], "loss": r["val_loss"]} for r in h])
log_history("metrics/train/aaclip_image", h)
log_histories("metrics/train/prompt_clip", {"brick": [{"epoch": 1, "loss": 1.5}, {"epoch": 2, "loss": 1.25}]})
log_histories("metrics/train/vpt_knn", {"brick": [{"epoch": 1, "separability": 0.25}, {"epoch": 2, "separability": 0.5}]})
"""
DIRS = ("aaclip_text", "aaclip_image", "prompt_clip", "vpt_knn")


def _sh(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
    return proc.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_documented_dvc_yaml_entries_render(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    _sh(["git", "init", "-q"], tmp_path, env)
    _sh(dvc + ["init", "-q"], tmp_path, env)
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "history.json").write_text(json.dumps(IMAGE_HISTORY))
    # the entries documented for the training stages (README), one stage writing all four directories
    stages = "stages:\n  train:\n    cmd: python stage.py\n    deps: [stage.py, history.json]\n    metrics:\n" + "".join(
        f"      - metrics/train/{d}/metrics.json:\n          cache: false\n" for d in DIRS) + "    plots:\n" + "".join(
        f"      - metrics/train/{d}/plots/metrics:\n          cache: false\n          x: step\n" for d in DIRS)
    (tmp_path / "dvc.yaml").write_text(stages)
    _sh(["git", "add", "-A"], tmp_path, env)
    _sh(["git", "commit", "-qm", "init"], tmp_path, env)  # dvclive needs a commit to read the Git state
    _sh(dvc + ["repro", "-q"], tmp_path, env)

    shown = json.loads(_sh(dvc + ["exp", "show", "--json"], tmp_path, env))
    metrics = shown[0]["data"]["metrics"]  # the workspace
    assert metrics["metrics/train/aaclip_image/metrics.json"]["data"]["selected"]["val_pixel_auroc"] == 0.625
    assert metrics["metrics/train/aaclip_image/metrics.json"]["data"]["val_loss"] == 4.75
    assert metrics["metrics/train/aaclip_text/metrics.json"]["data"]["loss"] == 4.75
    assert metrics["metrics/train/vpt_knn/metrics.json"]["data"]["brick"]["separability"] == 0.5

    plots = json.loads(_sh(dvc + ["plots", "show", "--json"], tmp_path, env))
    assert not plots.get("errors"), plots.get("errors")
    data = plots["data"]
    name = "metrics/train/aaclip_image/plots/metrics/val_pixel_auroc.tsv"
    values = data[name][0]["content"]["data"]["values"]
    assert [(v["step"], float(v["val_pixel_auroc"])) for v in values] == [("1", 0.625), ("2", 0.5)]
    assert data[name][0]["content"]["encoding"]["x"]["field"] == "step"
    for d in DIRS:
        assert any(k.startswith(f"metrics/train/{d}/plots/metrics/") for k in data), d
    brick = data["metrics/train/prompt_clip/plots/metrics/brick/loss.tsv"][0]["content"]["data"]["values"]
    assert [float(v["loss"]) for v in brick] == [1.5, 1.25]


@pytest.mark.parametrize("histories", [{}, {"": []}, {"alpha": [], "beta": []}])
def test_nothing_to_log_writes_dvclive_s_files_without_dvclive(tmp_path, histories):
    """A stage without curves (skipped, training-free) writes the files dvclive writes for an empty history, byte
    for byte, over the same stale files, and never imports dvclive (its start-up opens the DVC repository)."""
    import subprocess
    import sys

    from anomaly_core import tracking

    def stale(d):
        (d / "plots" / "metrics").mkdir(parents=True)
        (d / "plots" / "metrics" / "old.tsv").write_text("step\told\n0\t1\n")
        (d / "metrics.json").write_text('{"old": 1}\n')
        (d / "report.md").write_text("old\n")
        return d

    fast, slow = stale(tmp_path / "fast"), stale(tmp_path / "slow")
    tracking.log_histories(fast, histories)
    tracking._log_with_dvclive(slow, histories, "epoch", None)  # the path every history with rows takes
    (slow / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    (slow / "plots" / "metrics" / tracking.NO_CURVES).write_text("step\tno_curves\n")
    files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(fast) == files(slow)
    assert files(fast) == {"metrics.json": b"{}\n", "plots/metrics/no_curves.tsv": b"step\tno_curves\n"}
    code = (f"import sys; from anomaly_core.tracking import log_histories; log_histories({str(tmp_path / 'sub')!r}, "
            f"{histories!r}); assert 'dvclive' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
