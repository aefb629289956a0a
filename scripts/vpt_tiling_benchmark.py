"""Tiled VPT-kNN vs the resize path on a small generated high-resolution tree (the figure in README "Tiling").

    python scripts/vpt_tiling_benchmark.py --side 512 --epochs 20 --out /tmp/vpt_tiling_bench

One process, the same shots, backbone (backbones.visual of params.yaml) and params (knn, vpt_knn of params.yaml,
`--epochs` for speed): the resize path (features at 224 px, prompts trained on images) and the tiled path (native
`--side` px, tiles of 224 at stride 160, prompts trained on tiles), alternated A, B, A; time = features stage + fit +
score per path (metrics excluded), the tiled time divided by the mean of the two resize runs. Test metrics against
the full-resolution masks (the resize path's maps upsampled bilinearly), averaged over categories as `evaluate`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import typer
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
app = typer.Typer(add_completion=False)


def one_path(root: Path, rows, params: dict, tiling: dict | None, name: str) -> tuple[float, dict]:
    from typer.testing import CliRunner

    from anomaly_core.io import write_json
    from anomaly_core.methods import get_method
    from anomaly_core.methods.base import context_for
    from anomaly_core.store import FeatureStore
    from stages.features import app as features_app

    t0 = time.perf_counter()
    config = {"task": "anomaly", "features": {"batch_size": 16, "dtype": "float16"},
              "backbones": {"visual": params["backbones"]["visual"]}}
    stage = {"seed": 0, "data": {"image_size": params["side"]}, "vpt_knn": params["vpt_knn"], "knn": params["knn"]}
    if tiling is not None:
        config["tiling"] = stage["tiling"] = tiling
    write_json(root / f"{name}.json", config)
    res = CliRunner().invoke(features_app, ["--images", str(root / "images.csv"), "--config",
                                            str(root / f"{name}.json"), "--out", str(root / name)])
    if res.exit_code != 0:
        raise SystemExit(res.output)
    m = get_method("vpt_knn")
    ctx = context_for(m, stage, rows, FeatureStore(root / name), root / f"models-{name}")
    states, _ = m.fit(ctx)
    scores = m.score(ctx, states)
    return time.perf_counter() - t0, scores["test"]


def metrics(rows, test: dict, side: int) -> dict:
    from anomaly_core import evaluation as ev
    from anomaly_core.data import manifest as mf

    per = []
    for cat, (ids, image, maps) in test.items():
        part = mf.rows_for(rows, cat, "test")
        img, mp = ev.align(part, ids, image, maps)
        mp = ev.at_size(mp.astype(np.float32), side)
        per.append(ev.category_metrics(np.array([r.label for r in part]), ev.masks_for(part, side), img, mp, 0.3,
                                       category=cat))
    return {k: round(float(np.mean([p[k] for p in per])), 4) for k in ("pixel_ap", "pixel_aupro", "pixel_auroc",
                                                                         "image_auroc")}


@app.command()
def main(side: int = 512, epochs: int = 20, categories: str = "brick,grass", shots: int = 4, n_good: int = 4,
         n_defect: int = 3, out: Path = Path("/tmp/vpt_tiling_bench")) -> None:
    from anomaly_core.data import manifest as mf
    from anomaly_core.data.demo import generate_demo
    from anomaly_core.data.readers import read_mvtec
    from anomaly_core.store import SOURCE

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["vpt_knn"]["epochs"], params["side"] = epochs, side
    out.mkdir(parents=True, exist_ok=True)
    generate_demo(out / "demo", 0, categories.split(","), n_train=shots, n_test_good=n_good,
                  n_test_defect_per_type=n_defect, size=side, defect_px=(4.0, 16.0))
    rows = mf.select_shots(mf.carve_val(read_mvtec(out / "demo", "all"), 0.3, 0), shots, 0)
    mf.write_manifest([dataclasses.replace(r, split=SOURCE[r.split]) for r in rows], out / "images.csv")
    tiling = {"enabled": True, "tile": 224, "stride": 160, "resolution": "native", "position_aware": False}
    resize_params = {**params, "side": 224}
    t_a1, test_a = one_path(out, rows, resize_params, None, "resize1")
    t_b, test_b = one_path(out, rows, params, tiling, "tiled")
    t_a2, _ = one_path(out, rows, resize_params, None, "resize2")
    result = {"side": side, "tiles_per_image": 9 if side == 512 else None, "epochs": epochs,
              "time_s": {"resize": [round(t_a1, 1), round(t_a2, 1)], "tiled": round(t_b, 1)},
              "time_ratio": round(t_b / ((t_a1 + t_a2) / 2), 2),
              "resize": metrics(rows, test_a, side), "tiled": metrics(rows, test_b, side)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app()
