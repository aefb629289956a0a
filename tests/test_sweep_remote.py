"""A sweep spread over two machines (two clones) through one bare Git remote and one directory DVC remote;
a third clone pulls both experiments and `collect` sees both rows with their metrics."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly_core.sweep import exp_name, machine_slice, sweep_grid, sweep_run_commands

ROOT = Path(__file__).resolve().parents[1]

STAGE = """import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
os.makedirs("metrics", exist_ok=True)
json.dump({"knn": {"image_auroc": round(0.5 + 0.1 * p["shots"] + 0.01 * p["seed"], 4)},
           "_protocol": {"note": "stand-in"}}, open("metrics/summary.json", "w"))
open("model.txt", "w").write(f"model shots={p['shots']} seed={p['seed']}\\n")
"""
DVC_YAML = """stages:
  run:
    cmd: python stage.py
    deps: [stage.py]
    params: [seed, shots]
    outs: [model.txt]
    metrics:
      - metrics/summary.json:
          cache: false
"""


def test_grid_slices_are_disjoint_and_cover():
    grid = sweep_grid(["1", "2", "5"], ["0", "1"], ["knn.k=3"])
    assert len(grid) == 6 and grid[0] == {"shots": "1", "seed": "0", "knn.k": "3"}
    slices = [machine_slice(grid, i, 4) for i in range(4)]
    names = [exp_name(p) for s in slices for p in s]
    assert sorted(names) == sorted(exp_name(p) for p in grid) and len(set(names)) == 6
    assert [len(s) for s in slices] == [2, 2, 1, 1]
    with pytest.raises(ValueError):
        machine_slice(grid, 4, 4)
    with pytest.raises(ValueError):
        sweep_grid(["1"], ["0"], ["novalue"])
    cmds = [" ".join(c) for c in sweep_run_commands(slices[2], "origin")]  # slice 2 = grid point 2
    assert cmds[0].endswith("exp run --queue -n s2-seed0 -S shots=2 -S seed=0 -S knn.k=3")
    assert cmds[1].endswith("exp run --run-all --jobs 1")
    assert cmds[-2].endswith("exp push --run-cache origin s2-seed0") and cmds[-1].endswith("dvc push --run-cache")


def _env() -> dict:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1",
            "PYTHONPATH": str(ROOT), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t"}


def _sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_two_machines_push_third_pulls_and_collects(tmp_path):
    dvc, cli = [sys.executable, "-m", "dvc"], [sys.executable, "-m", "anomaly_core.cli"]
    remote, store, seed = tmp_path / "remote.git", tmp_path / "dvc-store", tmp_path / "seed"
    _sh(["git", "init", "-q", "--bare", "-b", "main", str(remote)], tmp_path)
    seed.mkdir()
    _sh(["git", "init", "-q", "-b", "main"], seed)
    _sh(dvc + ["init", "-q"], seed)
    _sh(dvc + ["remote", "add", "-d", "store", str(store)], seed)
    (seed / "params.yaml").write_text("seed: 0\nshots: 1\n")
    (seed / "stage.py").write_text(STAGE)
    (seed / "dvc.yaml").write_text(DVC_YAML)
    _sh(dvc + ["repro", "-q"], seed)
    _sh(["git", "add", "-A"], seed)
    _sh(["git", "commit", "-qm", "pipeline"], seed)
    _sh(["git", "remote", "add", "origin", str(remote)], seed)
    _sh(["git", "push", "-q", "origin", "main"], seed)
    _sh(dvc + ["push", "-q", "--run-cache"], seed)

    # two machines, one slice each of the 2-point grid (shots 1 and 2, seed 3)
    for i in range(2):
        clone = tmp_path / f"machine{i}"
        _sh(["git", "clone", "-q", str(remote), str(clone)], tmp_path)
        out = _sh(cli + ["sweep", "run", "--machine", str(i), "--machines", "2", "--shots", "1,2", "--seeds", "3",
                         "--git-remote", "origin"], clone)
        assert f"machine {i}/2: 1 experiments: s{i + 1}-seed3" in out
    assert (store / "runs").is_dir()  # run-cache pushed
    refs = _sh(["git", "for-each-ref", "refs/exps"], remote)
    assert "s1-seed3" in refs and "s2-seed3" in refs

    third = tmp_path / "analyst"
    _sh(["git", "clone", "-q", str(remote), str(third)], tmp_path)
    _sh(cli + ["sweep", "pull", "--git-remote", "origin", "--with-data"], third)
    _sh(cli + ["collect", "--out", "sweep"], third)
    with open(third / "sweep" / "experiments.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["experiment"])
    assert [(r["experiment"], r["shots"], r["seed"]) for r in rows] == [("s1-seed3", "1", "3"), ("s2-seed3", "2", "3")]
    assert [float(r["knn.image_auroc"]) for r in rows] == [pytest.approx(0.63), pytest.approx(0.73)]
    # --with-data brought the experiments' cached outputs from the DVC remote
    _sh(dvc + ["exp", "apply", "s2-seed3"], third)
    assert (third / "model.txt").read_text() == "model shots=2 seed=3\n"
