"""Tiled kNN at native resolution vs the 224 px resize path on a generated 1,024 px tree with 4-16 px defects.

    python scripts/tiling_benchmark.py                       # grass + brick, 8 shots, writes /tmp/tiling_bench
    python scripts/tiling_benchmark.py --categories grass --shots 4 --stride 224

Both paths use the same shots, the same EfficientNet-Lite0 backbone (backbones.visual of params.yaml) and the
kNN params of params.yaml (`knn`), and both are evaluated against the full-resolution masks: the resize path's
224 px maps are upsampled (bilinear) to the native size, the tiled path's maps are stitched at native size.
Each path runs in its own child process (the resize path before and after the tiled one, its time the mean of
the two: the load of a shared machine drifts), so its wall time (image decoding, features, search, stitching; metrics
excluded) and its peak resident memory (ru_maxrss, imports and model included) are its own. Metrics are computed
per category and averaged, as `evaluate` does.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import typer
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

app = typer.Typer(add_completion=False)
METRICS = ("pixel_ap", "pixel_aupro", "pixel_auroc", "image_auroc")


def tree(root: Path, categories: list[str], shots: int, n_good: int, n_defect: int, size: int, seed: int) -> None:
    from anomaly_core.data.demo import generate_demo

    stamp = root / "tree.json"
    want = {"categories": categories, "shots": shots, "n_good": n_good, "n_defect": n_defect, "size": size, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    generate_demo(root, seed, categories, n_train=shots, n_test_good=n_good, n_test_defect_per_type=n_defect,
                  size=size, defect_px=(4.0, 16.0))
    stamp.write_text(json.dumps(want))


def listing(root: Path, cat: str) -> tuple[list[str], list[str], list[int], list[str | None]]:
    """(shot paths, test paths, labels, mask paths) of one category of the MVTec-layout tree."""
    shots = sorted(str(p) for p in (root / cat / "train" / "good").glob("*.png"))
    tests, labels, masks = [], [], []
    for kind in sorted(p.name for p in (root / cat / "test").iterdir()):
        for p in sorted((root / cat / "test" / kind).glob("*.png")):
            tests.append(str(p))
            labels.append(int(kind != "good"))
            masks.append(None if kind == "good" else str(root / cat / "ground_truth" / kind / f"{p.stem}_mask.png"))
    return shots, tests, labels, masks


def run_path(path: str, root: Path, categories: list[str], tile: int, stride: int, position_aware: bool,
             resolution: str, out: Path) -> None:
    """Child process: score every category with one path, save maps/scores (npz) and time + peak memory."""
    import torch

    from anomaly_core.backbones import create_backbone
    from anomaly_core.config import BackboneConfig, build
    from anomaly_core.features import extract_features
    from anomaly_core.kit.knn import KnnConfig, PatchKnn
    from anomaly_core.kit.patches import cnn_patches
    from anomaly_core.kit.tiling import TilingConfig, resize_maps
    from anomaly_core.kit.tiled_knn import tiled_knn_scores
    from anomaly_core.store import level_list

    torch.manual_seed(0)
    params = yaml.safe_load(Path("params.yaml").read_text())
    bcfg = build(BackboneConfig, params["backbones"]["visual"], "backbones.visual")
    kcfg = build(KnnConfig, params["knn"], "knn")
    t0 = time.perf_counter()
    bb = create_backbone(bcfg.name, bcfg.pretrained, bcfg.levels, bcfg.image_size)
    t_model = time.perf_counter() - t0
    times = {}
    for cat in categories:
        shots, tests, _, _ = listing(root, cat)
        t0 = time.perf_counter()
        with torch.no_grad():
            if path == "resize":
                grid = lambda ps: cnn_patches(level_list(extract_features(bb, ps, 16, torch.float16, progress=False)),  # noqa: E731
                                              kcfg.patch_aggregate, kcfg.patch_pad)
                knn = PatchKnn.fit(grid(shots), kcfg, 0)
                image, maps = knn.predict(grid(tests), bcfg.image_size)
                maps = resize_maps(maps, _native(tests[0]))  # 224 px maps upsampled to the masks' size
            else:
                res = resolution if resolution == "native" else int(resolution)
                tiling = build(TilingConfig, {"enabled": True, "tile": tile, "stride": stride, "resolution": res,
                                              "position_aware": position_aware}, "tiling")
                cfg = replace(kcfg, image_score="max") if position_aware and kcfg.image_score == "reweight" else kcfg
                image, maps = tiled_knn_scores(bb, shots, tests, cfg, tiling, size=_native(tests[0]))
        times[cat] = time.perf_counter() - t0
        np.savez(out / f"{path}_{cat}.npz", image=image.numpy(), maps=maps.numpy().astype(np.float32))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{path}.json").write_text(json.dumps({"seconds": times, "model_seconds": t_model, "peak_rss_mb": peak_mb}))


def _native(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0]


@app.command()
def main(root: Path = typer.Option(Path("/tmp/tiling_bench/tree")), out: Path = typer.Option(Path("/tmp/tiling_bench")),
         categories: str = typer.Option("grass,brick"), shots: int = typer.Option(8),
         n_good: int = typer.Option(8), n_defect: int = typer.Option(4), size: int = typer.Option(1024),
         tile: int = typer.Option(224), stride: int = typer.Option(160), position_aware: bool = typer.Option(True),
         resolution: str = typer.Option("native", help="native or a side in px the images are resized to, then tiled"),
         seed: int = typer.Option(0), child: str = typer.Option("", hidden=True)) -> None:
    cats = [c for c in categories.split(",") if c]
    out.mkdir(parents=True, exist_ok=True)
    if child:
        run_path(child, root, cats, tile, stride, position_aware, resolution, out)
        return
    tree(root, cats, shots, n_good, n_defect, size, seed)
    argv = [sys.executable, __file__, "--root", str(root), "--out", str(out), "--categories", categories,
            "--tile", str(tile), "--stride", str(stride), "--resolution", resolution, "--position-aware" if position_aware else "--no-position-aware"]
    runs = []  # resize path seconds, timed before and after the tiled one: the load of a shared machine drifts
    for path in ("resize", "tiled", "resize"):
        subprocess.run([*argv, "--child", path], check=True)
        if path == "resize":
            runs.append(sum(json.loads((out / "resize.json").read_text())["seconds"].values()))

    from anomaly_core.data.images import load_mask
    from anomaly_core.metrics.anomaly import image_metrics, pixel_metrics

    result = {}
    for path in ("resize", "tiled"):
        info = json.loads((out / f"{path}.json").read_text())
        per = {}
        for cat in cats:  # streamed per category: one category's full-resolution maps and masks in memory
            _, tests, labels, mask_paths = listing(root, cat)
            z = np.load(out / f"{path}_{cat}.npz")
            masks = np.stack([load_mask(m, None) if m else np.zeros((size, size), bool) for m in mask_paths])
            per[cat] = {**pixel_metrics(masks, z["maps"]), **image_metrics(np.array(labels), z["image"])}
        mean = {k: float(np.mean([per[c][k] for c in cats])) for k in METRICS}
        seconds = float(np.mean(runs)) if path == "resize" else sum(info["seconds"].values())
        result[path] = {"mean": mean, "per_category": per, "seconds": seconds, "peak_rss_mb": info["peak_rss_mb"]}
    result["resize"]["seconds_runs"] = runs
    r, t = result["resize"], result["tiled"]
    result["ratio"] = {"pixel_ap": t["mean"]["pixel_ap"] / max(r["mean"]["pixel_ap"], 1e-12),
                       "seconds": t["seconds"] / r["seconds"], "peak_rss": t["peak_rss_mb"] / r["peak_rss_mb"]}
    (out / "tiling_benchmark.json").write_text(json.dumps(result, indent=1))
    typer.echo(f"{len(cats)} categories ({','.join(cats)}), {shots} shots, {size} px tiled at {resolution}, tile {tile} stride {stride}"
               f"{' position-aware' if position_aware else ''}")
    typer.echo(f"{'path':8s} " + " ".join(f"{m:>12s}" for m in METRICS) + f" {'seconds':>8s} {'peak MB':>8s}")
    for path in ("resize", "tiled"):
        x = result[path]
        typer.echo(f"{path:8s} " + " ".join(f"{x['mean'][m]:12.4f}" for m in METRICS)
                   + f" {x['seconds']:8.1f} {x['peak_rss_mb']:8.0f}")
    q = result["ratio"]
    typer.echo(f"tiled / resize: pixel AP x{q['pixel_ap']:.1f}, time x{q['seconds']:.2f}, peak memory x{q['peak_rss']:.2f}")


if __name__ == "__main__":
    app()
