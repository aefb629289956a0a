"""Cost of DVC tracking the dataset files: the `fingerprint` stage against the `prepare` stage on one generated
MVTec-layout tree, each run as DVC runs it (its own process, wall time including imports), in the same session.

    PYTHONPATH=. python scripts/fingerprint_cost.py --size 1024 --out /tmp/fp_cost

Prints one JSON: wall seconds of prepare, fingerprint cold (no stat cache: every file read and hashed), warm (nothing
changed: one stat per file), after one image replaced in place, and their ratios to prepare.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml

REPO = Path(__file__).resolve().parents[1]


INNER: list[float] = []  # the fingerprint stage's own seconds (its summary line), imports excluded


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    found = re.findall(r"changed since the last run, ([0-9.]+)s", proc.stdout)
    if found:
        INNER.append(float(found[-1]))
    return dt


def main(out: Path = typer.Option(Path("/tmp/fp_cost")), size: int = typer.Option(1024),
         n_train: int = typer.Option(24), repeats: int = typer.Option(2)) -> None:
    from anomaly_core.data.demo import generate_demo

    shutil.rmtree(out, ignore_errors=True)
    tree = out / "mvtec"
    generate_demo(tree, 0, n_train=n_train, size=size)
    files = [p for p in tree.rglob("*") if p.is_file()]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(methods=["knn"])
    params["data"].update(format="mvtec", root=str(tree))
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    py = sys.executable
    subprocess.run([py, "stages/validate.py", "--params", str(out / "params.yaml"), "--out", str(out / "config")],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    prepare = [py, "stages/prepare.py", "--config", str(out / "config" / "prepare.json"), "--out", str(out / "prep")]
    cache = out / "stat_cache.json"
    fingerprint = [py, "stages/fingerprint.py", "--config", str(out / "config" / "fingerprint.json"),
                   "--out", str(out / "fp"), "--stat-cache", str(cache)]
    runs: dict[str, list[float]] = {"prepare": [], "cold": [], "warm": [], "one_replaced": []}
    for _ in range(repeats):  # interleaved: the shared machine's load drifts
        runs["prepare"].append(_timed(prepare))
        cache.unlink(missing_ok=True)
        runs["cold"].append(_timed(fingerprint))
        runs["warm"].append(_timed(fingerprint))
        victim = tree / sorted(p.name for p in tree.iterdir())[0] / "train" / "good" / "000.png"
        victim.write_bytes(victim.read_bytes())  # same bytes, new ctime: re-hashed
        runs["one_replaced"].append(_timed(fingerprint))
    best = {k: min(v) for k, v in runs.items()}
    inner = {k: [INNER[3 * i + j] for i in range(repeats)] for j, k in enumerate(("cold", "warm", "one_replaced"))}
    print(json.dumps({"files": len(files), "bytes": sum(p.stat().st_size for p in files), "size_px": size,
                      "seconds": runs, "fingerprint_inner_seconds": inner,
                      "ratio_to_prepare": {k: round(best[k] / best["prepare"], 3) for k in best}},
                     indent=2))


if __name__ == "__main__":
    typer.run(main)
