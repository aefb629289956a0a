"""DVC stage `score`: every method writes image scores and pixel maps for val and test.

Methods: knn, zero_shot_clip, aaclip, multi_prototype, image_prototype, prompt_clip, vpt_knn.
"""
from pathlib import Path

import torch
import typer

from anomaly_core.adapters import ImageAdapterConfig, load_image_adapters, load_text_adapters, score_images
from anomaly_core.adapters.data import load_images
from anomaly_core.config import KnnConfig, ZeroShotConfig, build
from anomaly_core.data import manifest as mf
from anomaly_core.prompts import build_prompts
from anomaly_core.prompts.coop import CoopConfig, load_prompt_clip, score_prompt_clip
from anomaly_core.prompts.vpt import VptConfig, load_vpt, score_vpt
from anomaly_core.prototypes import MultiProtoConfig
from anomaly_core.prototypes.image_protos import ImageProtoConfig, load_image_prototypes, score_image_prototypes
from anomaly_core.prototypes.multi import load_multi_prototype, score_multi_prototype
from anomaly_core.scoring import EVAL_SPLITS, knn_scores, zero_shot_clip_scores
from anomaly_core.store import FeatureStore, save_scores
from stages.common import clip_backbone, skip_unless_anomaly, device, friendly_errors, get, load_params, progress, seed_everything

app = typer.Typer(add_completion=False)


def write(out: Path, method: str, scores) -> None:
    for split, per_cat in scores.items():
        save_scores(out / method / f"{split}.safetensors", per_cat)
    typer.echo(f"scored {method}")


def per_category(directory: Path, cats: list[str], loader, arch: str) -> dict:
    """Load one checkpoint per category with `loader(path, arch) -> (model, ckpt)`."""
    return {c: loader(directory / f"{c}.pt", arch)[0] for c in cats}


def aaclip_scores(clip, rows, models: Path, cfg: ImageAdapterConfig, arch: str, size: int):
    """AA-CLIP maps and image scores, run on the images (the adapted vision tower needs pixels)."""
    _, anchors = load_text_adapters(models / "aaclip_text.pt", clip, arch)
    adapters = load_image_adapters(models / "aaclip_image.pt", clip, arch)
    out = {s: {} for s in EVAL_SPLITS}
    for cat in mf.categories(rows):
        for split in EVAL_SPLITS:
            part = mf.rows_for(rows, cat, split)
            image, maps = score_images(clip, adapters, anchors, load_images(part, clip.image_size),
                                       [cat] * len(part), cfg, out_size=size)
            out[split][cat] = ([r.id for r in part], image, maps)
    return out


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         features: Path = typer.Option(Path("data/features")),
         models: Path = typer.Option(Path("data/models")),
         out: Path = typer.Option(Path("data/scores"))) -> None:
    params = load_params()
    if skip_unless_anomaly(params, dirs=(out,)):
        return
    seed = int(get(params, "seed"))
    seed_everything(seed)
    size = int(get(params, "data.image_size"))
    rows, store = mf.read_manifest(manifest), FeatureStore(features)
    cats = mf.categories(rows)
    knn_cfg = build(KnnConfig, params.get("knn"), "knn")
    write(out, "knn", knn_scores(store, rows, knn_cfg, size, seed, progress()))
    vpt_cfg = build(VptConfig, {**get(params, "vpt_knn"), "seed": seed}, "vpt_knn")
    vpt = per_category(models / "prompts" / "vpt_knn", cats, load_vpt, store.info[knn_cfg.branch]["name"])
    write(out, "vpt_knn", score_vpt(store, rows, vpt, vpt_cfg, knn_cfg, size, seed, progress()))
    if not store.has("clip"):
        return
    ccfg, clip = clip_backbone(params, device())
    with torch.no_grad():
        anchors = {c: clip.text_anchors(build_prompts(c)) for c in cats}
    zcfg = build(ZeroShotConfig, params.get("zero_shot"), "zero_shot")
    write(out, "zero_shot_clip", zero_shot_clip_scores(store, rows, anchors, zcfg, size))
    icfg = build(ImageAdapterConfig, {**get(params, "aaclip_image"), "seed": seed}, "aaclip_image")
    write(out, "aaclip", aaclip_scores(clip, rows, models, icfg, ccfg.name, size))
    mcfg = build(MultiProtoConfig, {**get(params, "multi_prototype"), "seed": seed}, "multi_prototype")
    multi = per_category(models / "prototypes" / "multi_prototype", cats, load_multi_prototype, ccfg.name)
    write(out, "multi_prototype", score_multi_prototype(store, rows, multi, mcfg, size, progress()))
    protos = per_category(models / "prototypes" / "image_prototype", cats, load_image_prototypes, ccfg.name)
    pcfg = build(ImageProtoConfig, params.get("image_prototype"), "image_prototype")
    write(out, "image_prototype", score_image_prototypes(store, rows, protos, pcfg, size, progress()))
    coop_cfg = build(CoopConfig, {**get(params, "prompt_clip"), "seed": seed}, "prompt_clip")
    coop = per_category(models / "prompts" / "prompt_clip", cats, load_prompt_clip, ccfg.name)
    write(out, "prompt_clip", score_prompt_clip(store, rows, coop, coop_cfg, size, progress()))


if __name__ == "__main__":
    app()
