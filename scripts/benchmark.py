"""Benchmark: feature-extraction throughput next to the bare backbone forward, kNN scoring time, stage times.

    python scripts/benchmark.py                 # micro-benchmarks on the prepared images
    python scripts/benchmark.py --stages        # also time every DVC stage (forces a re-run of each)

Run from the repository root after `dvc repro` (it reads data/prepared/images.csv and params.yaml).
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import typer
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.backbones import create_backbone, preprocess  # noqa: E402
from anomaly_core.config import BackboneConfig, KnnConfig, build  # noqa: E402
from anomaly_core.data import manifest as mf  # noqa: E402
from anomaly_core.features import extract_features, iter_batches  # noqa: E402
from anomaly_core.scoring.knn import PatchKnn, cnn_patches  # noqa: E402
from anomaly_core.store import level_list  # noqa: E402

app = typer.Typer(add_completion=False)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


@torch.no_grad()
def bare_forward(bb, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        bb(preprocess(batch, bb.image_size, bb.mean, bb.std))


@app.command()
def main(images: Path = Path("data/prepared/images.csv"), limit: int = 128, batch_size: int = 16,
         stages: bool = typer.Option(False, help="also time each DVC stage with `dvc repro -s -f`")) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    rows = mf.read_manifest(images)[:limit]
    paths = [r.image for r in rows]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(paths)} images")
    for branch in ("visual", "clip"):
        raw = params["backbones"].get(branch)
        if not raw:
            continue
        cfg = build(BackboneConfig, raw, f"backbones.{branch}")
        bb = create_backbone(cfg.name, cfg.pretrained, cfg.levels, cfg.image_size)
        batches = list(iter_batches(paths, bb.image_size, batch_size))
        bare_forward(bb, batches[:1])  # warm-up
        t_bare, _ = timed(bare_forward, bb, batches)
        t_feat, feats = timed(extract_features, bb, paths, batch_size, progress=False)
        print(f"{branch:>6} {cfg.name}: bare forward {len(paths) / t_bare:7.1f} img/s | "
              f"extract_features (decode+resize+forward+store) {len(paths) / t_feat:7.1f} img/s")
        if branch == "visual":
            kcfg = build(KnnConfig, params.get("knn"), "knn")
            grid = cnn_patches(level_list(feats), kcfg.patch_aggregate)
            n_bank = max(1, len(paths) // 2)
            t_bank, knn = timed(PatchKnn.fit, grid[:n_bank], kcfg, 0)
            t_score, _ = timed(knn.distances, grid[n_bank:])
            n_q = grid.shape[0] - n_bank
            print(f"   kNN: bank {knn.bank.shape[0]} patches x {knn.bank.shape[1]} dims built in {t_bank:.2f}s; "
                  f"scored {n_q} images in {t_score:.2f}s ({n_q / max(t_score, 1e-9):.1f} img/s)")
            for ratio in (0.1,):
                t_core, knn_c = timed(PatchKnn.fit, grid[:n_bank], replace(kcfg, coreset_ratio=ratio), 0)
                t_sc, _ = timed(knn_c.distances, grid[n_bank:])
                print(f"   kNN coreset {ratio}: bank {knn_c.bank.shape[0]} built in {t_core:.2f}s; "
                      f"scored in {t_sc:.2f}s ({n_q / max(t_sc, 1e-9):.1f} img/s)")
    if stages:
        time_stages()


def time_stages() -> None:
    """Force-run each stage alone, in pipeline order, and print its wall time."""
    names = subprocess.run(["dvc", "stage", "list", "--name-only"], check=True, capture_output=True,
                           text=True).stdout.split()  # foreach stages expanded: fit@knn, score@knn, ...
    total = 0.0
    for name in names:
        t0 = time.perf_counter()
        subprocess.run(["dvc", "repro", "-s", "-f", name], check=True, capture_output=True)
        dt = time.perf_counter() - t0
        total += dt
        print(f"stage {name:>20}: {dt:6.1f}s")
    print(f"stage {'total':>20}: {total:6.1f}s")


if __name__ == "__main__":
    app()
