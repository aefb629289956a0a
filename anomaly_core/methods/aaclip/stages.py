"""The work of AA-CLIP's two DVC stages (`train_text_adapter`, `train_image_adapter`), reached by the stage scripts
through `METHOD.stage_function(name)`. Each takes the stage's resolved params and paths and returns the training
history (per-epoch rows for dvclive) and a one-line summary; `save` decides whether this process writes (DDP)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anomaly_core.backbones import backbone_from_config
from anomaly_core.config import build, section
from anomaly_core.data import manifest as mf
from anomaly_core.methods.aaclip.checkpoints import load_text_adapters, save_image_adapters, save_text_adapters
from anomaly_core.methods.aaclip.core import ImageAdapterConfig, TextAdapterConfig, class_anchors
from anomaly_core.methods.aaclip.data import image_set, second_dataset_rows, text_stage_data, training_rows
from anomaly_core.methods.aaclip.training import train_image_adapters, train_text_adapters
from anomaly_core.store import FeatureStore

__all__ = ["train_text_adapter", "train_image_adapter"]


def train_text_adapter(params: dict[str, Any], manifest: Path, features: Path, out: Path, device: torch.device,
                       progress: bool = False) -> tuple[list[dict], str]:
    """Stage 1 on cached frozen CLIP tokens (or a second dataset's images; with aaclip_text.dpam, on the DPAM tokens
    of each batch's images); writes the text adapters and the anchors of every target (and second-dataset) category
    to `out`."""
    cfg = build(TextAdapterConfig, {**section(params, "aaclip_text"), "seed": int(section(params, "seed"))},
                "aaclip_text")
    torch.manual_seed(cfg.seed)
    size = int(section(params, "data.image_size"))
    ccfg, clip = backbone_from_config(section(params, "backbones.clip"), "backbones.clip", device)
    rows = mf.read_manifest(manifest)
    extra = second_dataset_rows(section(params, "aaclip.train_data"))
    images = clip.image_size if cfg.dpam else None  # DPAM tokens are computed per batch from the images
    if extra:  # cross-dataset protocol: train on every image of the second dataset
        data = text_stage_data(extra, size, backbone=clip, progress=progress, image_size=images)
    else:
        train, _ = training_rows(rows, cfg.seed, float(section(params, "aaclip.holdout_fraction")))
        data = text_stage_data(train, size, store=FeatureStore(features), image_size=images)
    adapters, anchors, hist = train_text_adapters(clip, data, cfg, progress)
    names = sorted(set(mf.categories(rows)) | set(mf.categories(extra)))
    with torch.no_grad():  # anchors for the target (and second-dataset) categories
        target_anchors = class_anchors(clip, adapters, names).cpu()
    save_text_adapters(out, adapters, target_anchors, names, ccfg.name)
    return hist, f"aaclip text adapters: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} over {cfg.epochs} epochs"


def train_image_adapter(params: dict[str, Any], manifest: Path, text_adapters: Path, out: Path, device: torch.device,
                        progress: bool = False) -> tuple[list[dict], str]:
    """Stage 2 with the stage-1 anchors frozen, data-parallel under torchrun; the checkpoint is chosen on the
    held-out val rows. Only the main process writes `out`."""
    from anomaly_core import distributed as dist

    cfg = build(ImageAdapterConfig, {**section(params, "aaclip_image"), "seed": int(section(params, "seed"))},
                "aaclip_image")
    torch.manual_seed(cfg.seed)
    size = int(section(params, "data.image_size"))
    ctx = dist.init(device)  # torchrun (dist.nproc > 1): one process per GPU / CPU rank
    ccfg, clip = backbone_from_config(section(params, "backbones.clip"), "backbones.clip", ctx.device)
    _, anchors = load_text_adapters(text_adapters, clip, ccfg.name)
    rows = mf.read_manifest(manifest)
    train, select = training_rows(rows, cfg.seed, float(section(params, "aaclip.holdout_fraction")))
    extra = second_dataset_rows(section(params, "aaclip.train_data"))
    if extra:  # cross-dataset protocol: every image of the second dataset trains; the target's val selects
        train, select = extra, [r for r in rows if r.split == "val"]
    val = image_set(select, clip.image_size, size) if select else None
    adapters, hist = train_image_adapters(clip, anchors, image_set(train, clip.image_size, size), val, cfg, progress)
    chosen = next((h["epoch"] for h in hist if h.get("selected")), cfg.epochs)
    dist.shutdown()
    if not ctx.is_main:
        return [], ""
    save_image_adapters(out, adapters, ccfg.name, selected_epoch=chosen)
    return hist, (f"aaclip image adapters: {len(train)} training images, {len(select)} selection images, "
                  f"epoch {chosen} selected on validation, {ctx.world_size} process(es)")
