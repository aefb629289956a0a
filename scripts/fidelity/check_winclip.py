"""Zero-shot CLIP vs anomalib 2.7.0 WinClip (models/image/winclip/{prompting,torch_model,utils}.py).

Tensor check on WinCLIP's own architecture, open_clip ViT-B-16-plus-240, with seeded random weights saved once to a
state-dict file both sides load (pretrained off, no network), and two demo images at 240 px:
prompt lists (states x templates), token ids, per-prompt text embeddings, the ensemble embeddings, the global image
embedding, the projected patch tokens, and anomalib's scoring rule (class_scores: softmax of cosine / temperature,
abnormal class) on the image embedding and on every patch token.
Ours is WinCLIP-style by design: our own prompt lists, a normalise-then-average ensemble, per-patch scores at several
layers (no window aggregation, no harmonic mean over scales), temperature 0.01, smoothing, a global / map-max mix.
The demo effect: WinCLIP's full zero-shot output vs ours on the demo's test images with the demo's tiny CLIP
(anomaly-core-tiny-clip, its random weights) through the same preprocessing, and ours with WinCLIP's ensemble and
temperature (to split the prompt effect from the aggregation effect)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import Ctx, Row, diff, row, run_peer

SRC = "anomalib 2.7.0 (PyPI) WinClip"
ARCH, SIZE, CLASS = "ViT-B-16-plus-240", 240, "washer"
ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "anomaly_core" / "backbones" / "configs"


def _weights(path: Path, arch: str, seed: int = 0) -> Path:
    """Seeded random open_clip weights, written once (temporary name, then renamed)."""
    if not path.exists():
        import open_clip

        from anomaly_core.backbones.clip import register_configs

        register_configs()
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return path


def tiny_weights(ctx: Ctx) -> Path:
    """The demo's tiny CLIP weights (ClipBackbone's seeded random init) as a state-dict file for the peers."""
    from anomaly_core.backbones.clip import TINY_CLIP, ClipBackbone

    path = ctx.work / "winclip_tiny_demo_weights.pt"
    if not path.exists():
        torch.save(ClipBackbone(TINY_CLIP, "random", levels=[1]).model.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return path


def _demo(root: Path) -> Path:
    from anomaly_core.data.demo import generate_demo

    if not (root / "washer").exists():
        generate_demo(root, seed=0)
    return root


def _test_set(root: Path, cat: str, size: int):
    """(uint8 images [N, S, S, 3], bool masks [N, S, S], labels [N]) of a demo category's test split."""
    from PIL import Image

    from anomaly_core.features import load_resized

    imgs, masks, labels = [], [], []
    for d in sorted(p for p in (root / cat / "test").iterdir() if p.is_dir()):
        for f in sorted(d.glob("*.png")):
            imgs.append(load_resized(str(f), size))
            if d.name == "good":
                masks.append(np.zeros((size, size), bool))
            else:
                m = Image.open(root / cat / "ground_truth" / d.name / f"{f.stem}_mask.png").convert("L")
                masks.append(np.asarray(m.resize((size, size), Image.NEAREST)) > 127)
            labels.append(int(d.name != "good"))
    return torch.from_numpy(np.stack(imgs)), np.stack(masks), np.array(labels)


def inputs(ctx: Ctx) -> dict:
    from anomaly_core.backbones import preprocess
    from anomaly_core.backbones.clip import ClipBackbone

    weights = _weights(ctx.work / "winclip_vitb16plus240_seed0.pt", ARCH)
    demo = _demo(ctx.work / "demo")
    clip = ClipBackbone(ARCH, str(weights), levels=[12])
    imgs, _, labels = _test_set(demo, CLASS, SIZE)
    pick = [int(np.flatnonzero(labels == 0)[0]), int(np.flatnonzero(labels == 1)[0])]  # one good, one defect
    x = preprocess(imgs[pick], SIZE, clip.mean, clip.std)
    return {"arch": ARCH, "weights": str(weights), "config_dir": "", "images": {CLASS: x}, "text_details": True}


def _tensor_rows(ctx: Ctx, inp: dict, off: dict) -> list[Row]:
    from anomaly_core.backbones.clip import ClipBackbone
    from anomaly_core.kit.anchors import anomaly_probs
    from anomaly_core.kit.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, build_prompts

    p = off["per_class"][CLASS]
    rows: list[Row] = []
    # prompt lists: compared as sets (the difference is by design: our lists are the seed's)
    n_ours, a_ours = build_prompts(CLASS)
    same_t = sorted(set(TEMPLATES) & set(off["templates"]))
    note = (f"ours {len(NORMAL_STATES)} normal x {len(ABNORMAL_STATES)} abnormal "
            f"states x {len(TEMPLATES)} templates = {len(n_ours)}+{len(a_ours)} prompts, WinCLIP "
            f"{len(off['normal_states'])} x {len(off['anomalous_states'])} x {len(off['templates'])} = "
            f"{len(p['normal'])}+{len(p['anomalous'])} (its template list holds 'a jpeg corrupted photo of the {{}}.'"
            f" twice); shared: normal states {len(set(NORMAL_STATES) & set(off['normal_states']))} (WinCLIP adds "
            f"{sorted(set(off['normal_states']) - set(NORMAL_STATES))}), abnormal "
            f"{len(set(ABNORMAL_STATES) & set(off['anomalous_states']))} (all 4 of WinCLIP's; ours add "
            f"{len(set(ABNORMAL_STATES) - set(off['anomalous_states']))}), templates {len(same_t)} of ours; "
            f"ours not in WinCLIP's: {sorted(set(TEMPLATES) - set(off['templates']))}")
    shared = len(set(n_ours + a_ours) & set(p["normal"] + p["anomalous"]))
    rows.append(Row("zero_shot_clip", SRC, "prompt lists (states x templates, class 'washer')", None, None, 0.0,
                    None, f"by design (the seed's lists): {shared} prompts in both ensembles; " + note))
    clip = ClipBackbone(ARCH, inp["weights"], levels=[12])
    prompts = p["normal"] + p["anomalous"]
    tok = clip.tokenize(prompts)
    rows.append(row("zero_shot_clip", SRC, f"token ids of WinCLIP's {len(prompts)} prompts", tok.float(),
                    p["tokens"].float(), tol=0.0))
    with torch.no_grad():
        emb = clip.encode_text(tok)
        rows.append(row("zero_shot_clip", SRC, f"text embeddings per prompt ({ARCH}, seeded random weights)",
                        emb, p["prompt_embeddings"]))
        nn_ = len(p["normal"])
        raw_rule = torch.stack([emb[:nn_].mean(0), emb[nn_:].mean(0)])
        rows.append(row("zero_shot_clip", SRC, "ensemble embeddings, WinCLIP's rule (mean of raw embeddings) "
                        "from our per-prompt embeddings", raw_rule, p["text_embeddings"]))
        ours_anchor = clip.text_anchors([p["normal"], p["anomalous"]])
        theirs = F.normalize(p["text_embeddings"], dim=-1)
        cos = (ours_anchor * theirs).sum(-1)
        a, r = diff(ours_anchor, theirs)
        rows.append(Row("zero_shot_clip", SRC, "ensemble anchors: ours (normalise each prompt, mean, normalise) vs "
                        "WinCLIP's (mean of raw, normalised by its cosine)", a, r, 0.0, None,
                        f"by design: on the same {len(prompts)} prompts cosine(ours, WinCLIP) = "
                        f"{cos[0]:.6f} normal, {cos[1]:.6f} abnormal (equal when every prompt embedding has the same "
                        "norm); CLIP's prompt-ensemble recipe normalises first"))
        feats = clip(inp["images"][CLASS])
        rows.append(row("zero_shot_clip", SRC, f"global image embedding ({SIZE} px, 2 demo images)",
                        feats["global"], p["image_embeddings"]))
        rows.append(row("zero_shot_clip", SRC, "patch tokens of the last layer (ln_post, proj)",
                        feats["levels"][0], p["patch_embeddings"]))
        t = float(off["temperature"])
        rows.append(row("zero_shot_clip", SRC, f"image score p(abnormal) at WinCLIP's anchors, T = {t}",
                        anomaly_probs(feats["global"][:, None], theirs, t)[:, 0], p["image_scores"]))
        rows.append(row("zero_shot_clip", SRC, f"patch scores p(abnormal) at WinCLIP's anchors, T = {t} (anomalib "
                        "class_scores on the same tokens)", anomaly_probs(feats["levels"][0], theirs, t),
                        p["patch_scores"], notes="WinCLIP itself never scores single patches zero-shot: its finest "
                        "scale is 2x2 windows (see the map row)"))
    return rows


def _demo_effect(ctx: Ctx) -> tuple[list[Row], dict]:
    """WinCLIP's zero-shot output vs ours on every demo test image (tiny CLIP, demo random weights)."""
    from anomaly_core.backbones import preprocess
    from anomaly_core.backbones.clip import TINY_CLIP, ClipBackbone
    from anomaly_core.config import build
    from anomaly_core.kit.anchors import zero_shot_scores
    from anomaly_core.kit.prompts import build_prompts
    from anomaly_core.methods.zero_shot_clip import ZeroShotConfig
    from anomaly_core.metrics.anomaly import image_metrics, pixel_metrics

    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = build(ZeroShotConfig, params["zero_shot_clip"], "zero_shot_clip")
    levels, size = params["backbones"]["clip"]["levels"], int(params["data"]["image_size"])
    clip = ClipBackbone(TINY_CLIP, "random", levels=levels)
    wpath = tiny_weights(ctx)
    demo = _demo(ctx.work / "demo")
    cats = sorted(p.name for p in demo.iterdir() if p.is_dir())
    data = {c: _test_set(demo, c, clip.image_size) for c in cats}
    x = {c: preprocess(d[0], clip.image_size, clip.mean, clip.std) for c, d in data.items()}
    off = run_peer(ctx, "peer_winclip.py", None, _save(ctx, "winclip_demo_in.pt", {
        "arch": TINY_CLIP, "weights": str(wpath), "config_dir": str(CONFIG_DIR), "images": x, "text_details": True}),
        ctx.work / "winclip_demo_out.pt")
    lab = data[CLASS][2]
    _fixture(ctx, off, data[CLASS][0], [int(np.flatnonzero(lab == 0)[0]), int(np.flatnonzero(lab == 1)[0])])
    t = float(off["temperature"])
    res: dict[str, dict[str, dict[str, float]]] = {}
    with torch.no_grad():
        for c in cats:
            _, masks, labels = data[c]
            f = clip(x[c])
            g = clip.grid
            ours_img, ours_map = zero_shot_scores(f["levels"], f["global"], clip.text_anchors(build_prompts(c)), g,
                                                  size, cfg.sigma, cfg.image_weight, cfg.temperature)
            wa = F.normalize(off["per_class"][c]["text_embeddings"], dim=-1)
            mix_img, mix_map = zero_shot_scores(f["levels"], f["global"], wa, g, size, cfg.sigma, cfg.image_weight, t)
            pc = off["per_class"][c]
            variants = {"ours": (ours_img, ours_map), "ours_winclip_prompts_T": (mix_img, mix_map),
                        "winclip": (pc["pred_score"], pc["anomaly_map"])}
            for name, (img, mp) in variants.items():
                m = {**image_metrics(labels, img.numpy()), **pixel_metrics(masks, mp.float().numpy())}
                res.setdefault(name, {})[c] = {k: m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
    mean = {v: {k: float(np.mean([res[v][c][k] for c in cats])) for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
            for v in res}
    n_img = sum(len(data[c][2]) for c in cats)
    fmt = lambda v: ", ".join(f"{k} {mean[v][k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pixel_aupro"))  # noqa: E731
    rows = [Row("zero_shot_clip", SRC, f"demo effect: zero-shot outputs on the {n_img} demo test images "
                f"({', '.join(cats)}), tiny CLIP with the demo's random weights", None, None, 0.0, None,
                f"by design, mean over categories: WinCLIP ({len(off['per_class'][cats[0]]['normal'])}+"
                f"{len(off['per_class'][cats[0]]['anomalous'])} prompts, T {t}, 2x2 / 3x3 windows on the last "
                f"layer, harmonic mean with the image score, image score = p(global)) {fmt('winclip')}; ours "
                f"(params.yaml: levels {levels} averaged per patch, T {cfg.temperature}, sigma {cfg.sigma}, image "
                f"{cfg.image_weight} p(global) + {1 - cfg.image_weight:g} max map) {fmt('ours')}; ours with "
                f"WinCLIP's ensemble and T {fmt('ours_winclip_prompts_T')}. Random CLIP weights: these say how "
                "much the rules move the numbers here, nothing about real CLIP")]
    return rows, {"per_category": res, "mean": mean}


def _save(ctx: Ctx, name: str, data: dict) -> Path:
    path = ctx.work / name
    torch.save(data, path)
    return path


def check(ctx: Ctx) -> list[Row]:
    inp = inputs(ctx)
    off = run_peer(ctx, "peer_winclip.py", None, _save(ctx, "winclip_in.pt", inp), ctx.work / "winclip_out.pt")
    rows = _tensor_rows(ctx, inp, off)
    demo_rows, effect = _demo_effect(ctx)
    torch.save(effect, ctx.work / "winclip_demo_effect.pt")
    return rows + demo_rows


def _fixture(ctx: Ctx, off: dict, imgs: torch.Tensor, pick: list[int]) -> None:
    """Small reference for tests/test_fidelity.py: anomalib's outputs on the demo's tiny CLIP (its random weights are
    rebuilt in-process by ClipBackbone(anomaly-core-tiny-clip, random), the ViT-B file is 830 MB) for 2 washer test
    images (one good, one defect) kept as uint8 (the test re-runs our preprocess)."""
    if ctx.fixtures is None:
        return
    p = off["per_class"][CLASS]
    ctx.save_fixture("winclip", {
        "lists": {k: off[k] for k in ("normal_states", "anomalous_states", "templates")},
        "temperature": off["temperature"], "class_name": CLASS, "images_uint8": imgs[pick].clone(),
        "normal": p["normal"], "anomalous": p["anomalous"], "tokens": p["tokens"][:, :16].clone(),
        "text_embeddings": p["text_embeddings"], "prompt_embeddings": p["prompt_embeddings"],
        "image_embeddings": p["image_embeddings"][pick], "image_scores": p["image_scores"][pick],
        "patch_embeddings": p["patch_embeddings"][pick], "patch_scores": p["patch_scores"][pick],
        "zero_shot_grid": p["zero_shot_grid"][pick],
    }, note=(f"made by scripts/fidelity/run.py --only zero_shot_clip --fixtures tests/fixtures/fidelity: {SRC} "
             "(peer_winclip.py, WinClipModel with BACKBONE anomaly-core-tiny-clip and PRETRAINED a state-dict file "
             "of ClipBackbone('anomaly-core-tiny-clip', 'random')) on 2 demo washer test images (demo seed 0; "
             "first good, first defect in sorted order), 224 px; tokens cut to the first 16 positions"))
