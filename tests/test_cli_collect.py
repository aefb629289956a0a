"""`anomaly-core collect`: parsing `dvc exp show --json` (DVC 3.x), aggregation over seeds, CSV + plot outputs."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from anomaly_core.cli import app
from anomaly_core.experiments import aggregate, collect_sweep, dedupe, parse_exp_show, run_exp_show

FIXTURE = Path(__file__).parent / "fixtures" / "dvc_exp_show.json"


def _synthetic_rows():
    rng = np.random.default_rng(0)
    rows = []
    for shots in (1, 2, 5, "all"):
        for seed in range(3):
            rows.append({"experiment": f"e{shots}-{seed}", "shots": shots, "seed": seed, "timestamp": "",
                         "metrics": {"knn": {"image_auroc": float(rng.uniform()), "pixel_auroc": float(rng.uniform())},
                                     "fusion": {"image_auroc": float(rng.uniform())}}})
    return rows


def test_aggregate_matches_numpy():
    rows = _synthetic_rows()
    table = aggregate(rows)
    assert [t["shots"] for t in table][::3] == [1, 2, 5, "all"]  # numeric shots ascending, 'all' last
    assert len(table) == 4 * 3
    for t in table:
        vals = np.array([r["metrics"][t["method"]][t["metric"]] for r in rows
                         if r["shots"] == t["shots"] and t["method"] in r["metrics"]])
        assert t["n"] == 3 and t["seeds"] == "0 1 2"
        assert t["mean"] == pytest.approx(vals.mean())
        assert t["std"] == pytest.approx(vals.std(ddof=1))
    single = aggregate(rows[:1])
    assert all(t["std"] == 0.0 and t["n"] == 1 for t in single)


def test_parse_fixture_keeps_finished_experiments_only():
    data = json.loads(FIXTURE.read_text())
    rows = parse_exp_show(data)
    got = sorted((r["experiment"], r["shots"], r["seed"]) for r in rows)
    # queued ("waiting") and failed ("broken") experiments and the workspace are dropped
    assert got == [("s1-seed0", 1, 0), ("s1-seed1", 1, 1), ("s2-seed0", 2, 0), ("s2-seed1", 2, 1)]
    r = next(r for r in rows if r["experiment"] == "s2-seed1")
    assert r["metrics"]["knn"] == {"image_auroc": 0.65, "pixel_auroc": 0.82}
    assert r["metrics"]["chosen"] == {"top1": 0.52, "top5": 0.9}  # from metrics/classification.json
    assert "_protocol" not in r["metrics"] and r["baseline"] == "master" and r["kind"] == "experiment"
    with_base = parse_exp_show(data, include_baseline=True)
    assert [r["kind"] for r in with_base].count("baseline") == 1


def test_dedupe_keeps_newest():
    rows = [{"shots": 1, "seed": 0, "timestamp": "2025-01-01T00:00:00", "metrics": {"a": {"m": 0.1}}},
            {"shots": 1, "seed": 0, "timestamp": "2025-01-02T00:00:00", "metrics": {"a": {"m": 0.2}}},
            {"shots": 1, "seed": 1, "timestamp": "2025-01-01T00:00:00", "metrics": {"a": {"m": 0.3}}}]
    kept, dropped = dedupe(rows)
    assert dropped == 1 and [r["metrics"]["a"]["m"] for r in kept] == [0.2, 0.3]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_collect_from_json(tmp_path):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["collect", "--from-json", str(FIXTURE), "--out", str(out),
                                   "--metric", "image_auroc", "--methods", "knn,fusion"])
    assert res.exit_code == 0, res.output
    exps = _read_csv(out / "experiments.csv")
    assert len(exps) == 4 and "knn.image_auroc" in exps[0] and "chosen.top1" not in exps[0]
    agg = _read_csv(out / "aggregate.csv")
    row = next(a for a in agg if a["shots"] == "1" and a["method"] == "knn" and a["metric"] == "image_auroc")
    assert float(row["mean"]) == pytest.approx(np.mean([0.62, 0.63]), abs=1e-6)  # CSV: 6 decimals
    assert float(row["std"]) == pytest.approx(np.std([0.62, 0.63], ddof=1), abs=1e-6)
    png = out / "image_auroc_vs_shots.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_collect_errors(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    res = CliRunner().invoke(app, ["collect", "--from-json", str(empty), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    res = CliRunner().invoke(app, ["collect", "--repo", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2  # not a DVC repository: DVC's message, no traceback


STAGE = """import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
os.makedirs("metrics", exist_ok=True)
json.dump({"knn": {"image_auroc": 0.5 + 0.1 * p["shots"] + 0.01 * p["seed"]}, "_protocol": {"note": "x"}},
          open("metrics/summary.json", "w"))
"""
DVC_YAML = """stages:
  run:
    cmd: python stage.py
    deps: [stage.py]
    params: [seed, shots]
    metrics:
      - metrics/summary.json:
          cache: false
"""


def _sh(cmd: list[str], cwd: Path, env: dict) -> None:
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_real_dvc_repo(tmp_path, monkeypatch):
    """A throwaway git + DVC repo with two `dvc exp run -S` experiments, collected through `dvc exp show --json`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    _sh(["git", "init", "-q"], repo, env)
    _sh(dvc + ["init", "-q"], repo, env)
    (repo / "params.yaml").write_text("seed: 0\nshots: 1\n")
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _sh(dvc + ["repro", "-q"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "init"], repo, env)
    for shots, seed in ((1, 1), (2, 0)):
        _sh(dvc + ["exp", "run", "-q", "-S", f"shots={shots}", "-S", f"seed={seed}"], repo, env)
    for key in ("PATH", "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(key, env[key])
    data = run_exp_show(repo)
    rows = parse_exp_show(data)
    got = sorted((r["shots"], r["seed"], r["metrics"]["knn"]["image_auroc"]) for r in rows)
    assert got == [(1, 1, pytest.approx(0.61)), (2, 0, pytest.approx(0.7))]
    summary = collect_sweep(data, tmp_path / "out", "image_auroc", include_baseline=True)
    assert summary["experiments"] == 3 and summary["duplicates_dropped"] == 0
