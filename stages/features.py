"""DVC stage `features`: run each frozen backbone the selected methods need once over every image and cache
the features.

One safetensors file per (branch, category, source split) under `data/features/`, plus `info.json`
describing the backbones (name, weights, untrained flag, levels, grid). The branches come from
`data/config/features.json` (the `validate` stage keeps only those the selected methods read). With a `tiling`
entry (`tiling.enabled: true`) the visual branch is extracted per tile: `level_j` [N, T, C, h, w] and the tile
offsets / tiled size in the file's metadata (`features.extract_tile_features`).
"""
import time
from pathlib import Path

import torch
import typer

from anomaly_core import distributed as dist
from anomaly_core.backbones import create_backbone
from anomaly_core.config import BackboneConfig, FeaturesConfig, build
from anomaly_core.data import manifest as mf
from anomaly_core.features import extract_features_sharded
from anomaly_core.kit.tiling import extract_tile_features, tiling_from
from anomaly_core.io import save_tensors, write_json
from stages.common import device, friendly_errors, load_config, progress, run

app = typer.Typer(add_completion=False)
BRANCHES = ("visual", "clip")


def backbone_info(bb, cfg: BackboneConfig) -> dict:
    info = {"name": bb.name, "pretrained": bb.pretrained, "untrained": bb.untrained, "levels": cfg.levels,
            "image_size": bb.image_size, "kind": bb.kind}
    if bb.missing_tensors:  # allow_partial_weights: these kept their (seeded) random initialisation
        info["missing_tensors"] = list(bb.missing_tensors)
    if bb.kind == "clip":
        info.update(grid=bb.grid, embed_dim=bb.embed_dim, width=bb.width)
    else:
        info.update(channels=bb.channels, reductions=bb.reductions)
    return info


@app.command()
@friendly_errors
def main(images: Path = typer.Option(Path("data/prepared/images.csv")),
         config: Path = typer.Option(Path("data/config/features.json")),
         out: Path = typer.Option(Path("data/features"))) -> None:
    params = load_config(config)
    fcfg = build(FeaturesConfig, params["features"], "features")
    dtype = getattr(torch, fcfg.dtype)
    rows = mf.read_manifest(images)
    ctx = dist.init(device())  # torchrun (dist.nproc > 1): rank r extracts every world-th batch, rank 0 writes
    dev = ctx.device
    tiling = tiling_from(params)  # None unless tiling.enabled (validate keeps the key out of features.json then)
    info = {}
    for branch in BRANCHES:
        raw = params["backbones"].get(branch)
        if raw is None:
            continue
        cfg = build(BackboneConfig, raw, f"backbones.{branch}")
        bb = create_backbone(cfg.name, cfg.pretrained, cfg.levels, cfg.image_size, cfg.allow_partial_weights).to(dev)
        info[branch] = backbone_info(bb, cfg)
        if bb.missing_tensors and ctx.is_main:
            m = bb.missing_tensors
            typer.echo(f"warning: features: backbones.{branch}.pretrained={cfg.pretrained}: {len(m)} backbone tensors "
                       f"not in the file stay random (allow_partial_weights: true): {', '.join(m[:10])}"
                       f"{', ...' if len(m) > 10 else ''} (all in {out / 'info.json'})", err=True)
        if tiling is not None and branch == "visual":
            info[branch]["tiling"] = {"tile": tiling.tile, "stride": tiling.stride, "resolution": tiling.resolution}
        t0, n = time.perf_counter(), 0
        for cat in mf.categories(rows):
            for split in ("train", "test"):
                part = mf.rows_for(rows, cat, split)
                if not part:
                    continue
                meta = {"ids": [r.id for r in part], "backbone": bb.name, "pretrained": bb.pretrained}
                if tiling is not None and branch == "visual":  # validate refused dist.nproc > 1 with tiling
                    # the pipeline's rows passed `prepare`, which enforced data.max_pixels: no second limit here
                    feats, offsets, hw = extract_tile_features(bb, [r.image for r in part], tiling, fcfg.batch_size,
                                                               dtype, f"{branch}/{cat}/{split} tiles", progress(),
                                                               max_pixels=2**62)
                    meta.update(tiles=offsets.tolist(), tiled_hw=list(hw))
                else:
                    feats = extract_features_sharded(bb, [r.image for r in part], fcfg.batch_size, dtype,
                                                     desc=f"{branch}/{cat}/{split}", progress=progress() and ctx.is_main)
                if feats is None:  # not rank 0: its batches went to rank 0
                    continue
                if bb.kind == "clip":
                    meta["grid"] = [bb.grid, bb.grid]
                save_tensors(out / branch / cat / f"{split}.safetensors", {k: v.cpu() for k, v in feats.items()}, meta)
                n += len(part)
        dt = time.perf_counter() - t0
        if ctx.is_main:
            typer.echo(f"{branch}: {bb.name} ({bb.pretrained}) {n} images in {dt:.1f}s ({n / max(dt, 1e-9):.1f} img/s)")
    dist.shutdown()
    if ctx.is_main:
        write_json(out / "info.json", info)


if __name__ == "__main__":
    run(app)
