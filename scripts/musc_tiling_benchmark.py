"""Tiled MuSc vs untiled MuSc (224 px resize) on a small generated high-resolution tree, in one process.

    python scripts/musc_tiling_benchmark.py --size 448 --stride 224      # 4 tiles per image

Both paths score the same pool (one category's test images, transductive) with the MuSc params of params.yaml and
its visual backbone (features in float16, as the features stage caches them); both are evaluated against the
full-resolution masks (the untiled 224 px maps upsampled bilinearly). Paths alternate untiled, tiled (pool),
tiled (position-aware), untiled; each time is decoding + features + scoring (metrics excluded), the untiled one
the mean of its two runs.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import typer
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

app = typer.Typer(add_completion=False)


class Cache:
    """The FeatureStore interface over in-memory features of one pool (ids = paths)."""

    def __init__(self, feats, offsets=None, hw=None):
        self.feats, self.offsets, self.hw = feats, offsets, hw

    def get(self, branch, rows):
        return {k: v.float() for k, v in self.feats.items()}

    def levels(self, feats):
        from anomaly_core.store import level_list

        return level_list(feats)

    def tiles(self, branch, rows):
        return self.offsets, self.hw


@app.command()
def main(root: Path = typer.Option(Path("/tmp/musc_tiling_bench")), category: str = typer.Option("brick"),
         size: int = typer.Option(448), n_good: int = typer.Option(4), n_defect: int = typer.Option(2),
         stride: int = typer.Option(224)) -> None:
    import torch

    from anomaly_core.backbones import create_backbone
    from anomaly_core.config import BackboneConfig, build
    from anomaly_core.data.images import load_mask
    from anomaly_core.features import extract_features
    from anomaly_core.kit.tiling import TilingConfig, extract_tile_features, resize_maps
    from anomaly_core.metrics.anomaly import image_metrics, pixel_metrics
    from anomaly_core.methods.musc import MuscConfig, musc_pool
    from anomaly_core.methods.musc.tiled import tiled_pool
    from tiling_benchmark import listing, tree

    params = yaml.safe_load(Path("params.yaml").read_text())
    bcfg = build(BackboneConfig, params["backbones"]["visual"], "backbones.visual")
    cfg = build(MuscConfig, params["musc"], "musc")
    tree(root, [category], 0, n_good, n_defect, size, 0)
    _, tests, labels, mask_paths = listing(root, category)
    bb = create_backbone(bcfg.name, bcfg.pretrained, bcfg.levels, bcfg.image_size)
    torch.manual_seed(0)

    def untiled():
        feats = extract_features(bb, tests, 16, torch.float16, progress=False)
        image, maps = musc_pool(Cache(feats), tests, cfg, bcfg.image_size)
        return image, resize_maps(maps, size)

    def tiled(position_aware):
        tiling = TilingConfig(enabled=True, tile=bcfg.image_size, stride=stride, resolution="native",
                              position_aware=position_aware)
        feats, offsets, hw = extract_tile_features(bb, tests, tiling, 16, torch.float16)
        return tiled_pool(Cache(feats, offsets, hw), tests, cfg, tiling, size)

    runs = {}
    for name, fn in (("untiled", untiled), ("tiled_pool", lambda: tiled(False)),
                     ("tiled_position", lambda: tiled(True)), ("untiled", untiled)):
        t0 = time.perf_counter()
        with torch.no_grad():
            image, maps = fn()
        runs.setdefault(name, []).append(time.perf_counter() - t0)
        runs[name + "_out"] = (image.numpy(), maps.float().numpy())
    masks = np.stack([load_mask(m, None) if m else np.zeros((size, size), bool) for m in mask_paths])
    base = float(np.mean(runs["untiled"]))
    typer.echo(f"{category}: {len(tests)} test images ({sum(labels)} defective) at {size} px, tile "
               f"{bcfg.image_size} stride {stride}; untiled runs {runs['untiled'][0]:.1f} s, {runs['untiled'][1]:.1f} s")
    typer.echo(f"{'path':15s} {'pixel_ap':>9s} {'aupro':>7s} {'pix_auroc':>9s} {'img_auroc':>9s} {'seconds':>8s} {'x':>6s}")
    for name in ("untiled", "tiled_pool", "tiled_position"):
        image, maps = runs[name + "_out"]
        m = {**pixel_metrics(masks, maps), **image_metrics(np.array(labels), image)}
        sec = float(np.mean(runs[name]))
        typer.echo(f"{name:15s} {m['pixel_ap']:9.4f} {m['pixel_aupro']:7.4f} {m['pixel_auroc']:9.4f} "
                   f"{m['image_auroc']:9.4f} {sec:8.1f} {sec / base:6.2f}")


if __name__ == "__main__":
    app()
