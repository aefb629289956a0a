"""Same images, same pixels: our patch kNN (params.yaml defaults) against anomalib 2.7.0 PatchCore (its defaults).

    python scripts/compare_peer_knn.py                          # 5 categories the demo does not draw, 20 train,
                                                                # 16 good + 4 x 4 defect test images, 256 px
    python scripts/compare_peer_knn.py --categories lunar,disc --n-train 16 --peer-python ''   # ours only

Per category of a generated tree (anomaly_core.data.demo; default categories none of the demo's four: the
textures `lunar`, `tissue` and the parts `triangle_plate`, `brass_nut`, `square_nut`, which turn by up to
+-1.0 / 1.5 / 0.75 rad), the rows go through our protocol (data.val_fraction carve, seed, all shots), and every
system scores THE SAME test-split images:

* ours: the backbone of params.yaml (EfficientNet-Lite0, levels [2, 3]) on the image resized as the features
  stage does (PIL bicubic to backbones.visual.image_size, features cached in features.dtype), then
  `PatchKnn` at params.yaml's `knn` section, maps at data.image_size;
* the peer: anomalib PatchCore (scripts/compare_peer_patchcore.py in its own venv: feature pooler, embedding,
  KCenterGreedy coreset 0.1, nearest neighbour, re-weighted image score, its anomaly map generator) on the
  feature maps of the same backbone and weights, computed on its own input: anomalib's default pre-processor
  (torchvision Resize 256 with antialias; no crop: `center_crop_size` defaults to None in 2.7.0; the run checks
  our replica of it against anomalib's own transform), so its maps are 256 px.
  Also the peer on our input (same features as ours: the method alone) and on the paper's input (Resize 256 +
  CenterCrop 224).

Every map is then evaluated on common frames (maps resampled bilinearly, masks nearest from the native mask):
`full224` (the whole image at 224 px: our evaluate's frame), `full256` (the whole image at 256 px: the peer's
frame) and `crop224` (the central 224/256 of the image at 224 px, the region the paper's center crop keeps).
Variants of ours on the same images isolate each difference (coreset, upsampling, smoothing sigma, aggregation
window, image-score rule, resize interpolation, resolution, feature dtype). Prints per-category tables and the
mean of each variant; writes bench/compare_peer_knn.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from anomaly_core.config import BackboneConfig, build  # noqa: E402
from anomaly_core.data import manifest as mf  # noqa: E402
from anomaly_core.data.images import load_image  # noqa: E402
from anomaly_core.data.readers import read_mvtec  # noqa: E402
from anomaly_core.evaluation import category_metrics, frame_maps, frame_masks  # noqa: E402
from anomaly_core.kit.knn import KnnConfig, PatchKnn  # noqa: E402
from anomaly_core.kit.patches import cnn_patches  # noqa: E402

CATEGORIES = ["lunar", "tissue", "triangle_plate", "brass_nut", "square_nut"]
PEER_PYTHON = os.environ.get("FIDELITY_PEER_PYTHON", "/tmp/fidelity/anomalib/bin/python")
CROP = (16 / 256, 240 / 256)  # anomalib / PatchCore paper: Resize 256, CenterCrop 224 (fraction of the image side)
FRAMES = {"full224": ((0.0, 1.0), 224), "full256": ((0.0, 1.0), 256), "crop224": (CROP, 224)}
KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro")

# input name -> (how the image becomes the backbone input, the image region it covers)
INPUTS = {
    "pil224": "PIL bicubic to 224 (our features stage)",
    "tv224": "torchvision Resize 224, bilinear + antialias",
    "tv256": "torchvision Resize 256, bilinear + antialias (anomalib 2.7.0 default)",
    "tv256crop": "Resize 256 + CenterCrop 224 (PatchCore paper; anomalib's center_crop_size=(224, 224))",
}


def load_input(paths: list[str], mode: str, size: int) -> torch.Tensor:
    """Images -> float [N, 3, S, S] in [0, 1] as the named input mode prepares them (before normalisation)."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for p in paths:
        img = np.array(load_image(p))  # a writable copy for torch
        if mode == "pil224":
            if img.shape[:2] != (size, size):
                img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
            out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0)
            continue
        x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0  # anomalib reads images as float in [0, 1]
        side = 224 if mode == "tv224" else 256
        x = TF.resize(x, [side, side], antialias=True)
        if mode == "tv256crop":
            x = TF.center_crop(x, [224, 224])
        out.append(x)
    return torch.stack(out)


def region(mode: str) -> tuple[float, float]:
    return CROP if mode == "tv256crop" else (0.0, 1.0)


def normalise(x: torch.Tensor, backbone) -> torch.Tensor:
    mean = torch.tensor(backbone.mean)[None, :, None, None]
    std = torch.tensor(backbone.std)[None, :, None, None]
    return (x - mean) / std


@torch.no_grad()
def levels_of(backbone, x: torch.Tensor, batch: int = 16) -> list[torch.Tensor]:
    """Normalised inputs through the backbone -> its levels [N, C_j, h_j, w_j] float32."""
    parts = [backbone(normalise(x[i : i + batch], backbone))["levels"] for i in range(0, len(x), batch)]
    return [torch.cat([p[j] for p in parts]).float() for j in range(len(parts[0]))]


def ours(train: list[torch.Tensor], test: list[torch.Tensor], cfg: KnnConfig, size: int, seed: int):
    """PatchKnn on cnn_patches of the levels -> (image [N], maps [N, size, size])."""
    knn = PatchKnn.fit(cnn_patches(train, cfg.patch_aggregate, cfg.patch_pad), cfg, seed)
    return knn.predict(cnn_patches(test, cfg.patch_aggregate, cfg.patch_pad), size)


def peer(train: list[torch.Tensor], test: list[torch.Tensor], size: int, seed: int, peer_python: str,
         work: Path, check: torch.Tensor | None = None, ratio: float = 0.1) -> dict:
    inp, out = work / "peer_in.pt", work / "peer_out.pt"
    payload = {"train": train, "test": test, "ratio": ratio, "seed": seed, "size": size}
    if check is not None:
        payload["check_images"] = check
    torch.save(payload, inp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([peer_python, str(HERE / "compare_peer_patchcore.py"), str(inp), str(out)], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"peer PatchCore failed: {res.stderr.strip().splitlines()[-5:]}")
    return torch.load(out, weights_only=False)


def variants(base: KnnConfig) -> dict[str, tuple[str, KnnConfig, str, bool]]:
    """name -> (input mode, KnnConfig, feature dtype, what it isolates). The first is ours at the defaults."""
    return {
        "ours": ("pil224", base, "float16", "params.yaml defaults"),
        "ours coreset 0.1": ("pil224", replace(base, coreset_ratio=0.1), "float16", "coreset vs full bank"),
        "ours upsample nearest": ("pil224", replace(base, upsample="nearest"), "float16", "upsampling (anomalib: nearest)"),
        "ours sigma 2": ("pil224", replace(base, sigma=2.0), "float16", "smoothing sigma"),
        "ours sigma 8": ("pil224", replace(base, sigma=8.0), "float16", "smoothing sigma"),
        "ours aggregate 5": ("pil224", replace(base, patch_aggregate=5), "float16", "aggregation window"),
        "ours image max": ("pil224", replace(base, image_score="max"), "float16", "image-score rule"),
        "ours float32 features": ("pil224", base, "float32", "feature cache dtype"),
        "ours tv224": ("tv224", base, "float16", "resize interpolation (bilinear+antialias)"),
        "ours 256 px": ("tv256", base, "float16", "resolution: the peer's input"),
        "ours 256 px nearest coreset 0.1": ("tv256", replace(base, upsample="nearest", coreset_ratio=0.1), "float32",
                                            "anomalib's recipe on its input"),
        "ours crop": ("tv256crop", base, "float16", "the paper's center crop"),
    }


PEERS = {"peer": "tv256", "peer on our input": "pil224", "peer crop": "tv256crop"}


def evaluate(rows, labels, image, maps, src, frames, max_fpr) -> dict:
    out = {}
    for name, frame in frames.items():
        if frame[0][0] < src[0] - 1e-9 or frame[0][1] > src[1] + 1e-9:
            continue  # the frame reaches outside what the input saw
        m = category_metrics(labels, frame_masks(rows, frame), image.numpy(), frame_maps(maps, src, frame), max_fpr)
        out[name] = {k: round(float(m[k]), 4) for k in KEYS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("bench/compare_tree"), help="generated tree (made if missing)")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--n-train", type=int, default=20)
    ap.add_argument("--n-test-good", type=int, default=16)
    ap.add_argument("--n-defect", type=int, default=4, help="test images per defect type (4 types)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--demo-seed", type=int, default=0)
    ap.add_argument("--peer-python", default=PEER_PYTHON, help="anomalib venv python; '' = ours only")
    ap.add_argument("--only", default="", help="comma-separated variant names of ours to run (default all)")
    ap.add_argument("--frames", default="full224,full256,crop224")
    ap.add_argument("--out", type=Path, default=Path("bench/compare_peer_knn.json"))
    args = ap.parse_args()

    from anomaly_core.backbones import create_backbone
    from anomaly_core.data.demo import generate_demo

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    seed, val_fraction = int(params["seed"]), float(params["data"]["val_fraction"])
    max_fpr, map_size = float(params["evaluate"]["max_fpr"]), int(params["data"]["image_size"])
    base = build(KnnConfig, params["knn"], "knn")
    vcfg = build(BackboneConfig, params["backbones"]["visual"], "backbones.visual")
    cats = [c for c in args.categories.split(",") if c]
    frames = {k: FRAMES[k] for k in args.frames.split(",")}
    stamp = {"categories": cats, "n_train": args.n_train, "n_test_good": args.n_test_good, "n_defect": args.n_defect,
             "size": args.size, "seed": args.demo_seed}
    stamp_file = args.root / "tree.json"
    if not (stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp):
        generate_demo(args.root, args.demo_seed, cats, n_train=args.n_train, n_test_good=args.n_test_good,
                      n_test_defect_per_type=args.n_defect, size=args.size)
        stamp_file.write_text(json.dumps(stamp))
    rows = mf.select_shots(mf.carve_val(read_mvtec(args.root, cats), val_fraction, seed), "all", seed)
    var = variants(base)
    if args.only:
        var = {k: v for k, v in var.items() if k == "ours" or k in args.only.split(",")}
    need = {mode for mode, *_ in var.values()} | (set(PEERS.values()) if args.peer_python else set())
    backbones = {s: create_backbone(vcfg.name, vcfg.pretrained, vcfg.levels, s) for s in (224, 256)}
    result: dict = {"tree": stamp, "protocol": {"seed": seed, "val_fraction": val_fraction, "max_fpr": max_fpr},
                    "inputs": {k: INPUTS[k] for k in sorted(need)}, "variants": {k: v[3] for k, v in var.items()},
                    "per_category": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for ci, cat in enumerate(cats):
            t0 = time.perf_counter()
            train = [r.image for r in mf.rows_for(rows, cat, "train") if r.shot]
            test_rows = mf.rows_for(rows, cat, "test")
            labels = np.array([r.label for r in test_rows])
            feats = {}
            for mode in sorted(need):
                side = 256 if mode == "tv256" else 224
                feats[mode] = {split: levels_of(backbones[side], load_input(paths, mode, side))
                               for split, paths in (("train", train), ("test", [r.image for r in test_rows]))}
            res: dict = {"n_train": len(train), "n_test": len(test_rows), "n_test_defect": int(labels.sum())}
            for name, (mode, cfg, dtype, _) in var.items():
                cast = (lambda ls: [l.half().float() for l in ls]) if dtype == "float16" else (lambda ls: ls)
                side = 256 if mode == "tv256" else map_size
                image, maps = ours(cast(feats[mode]["train"]), cast(feats[mode]["test"]), cfg, side, seed)
                res[name] = evaluate(test_rows, labels, image, maps, region(mode), frames, max_fpr)
            if args.peer_python:
                for name, mode in PEERS.items():
                    check = None
                    if ci == 0 and mode == "tv256":  # our replica of anomalib's pre-processor vs its own
                        check = torch.stack([torch.from_numpy(np.array(load_image(r.image))).permute(2, 0, 1).float() / 255.0
                                             for r in test_rows[:4]])
                    side = 256 if mode == "tv256" else 224
                    got = peer(feats[mode]["train"], feats[mode]["test"], side, seed, args.peer_python, Path(tmp),
                               check)
                    res[name] = evaluate(test_rows, labels, got["image"], got["maps"], region(mode), frames, max_fpr)
                    res[name]["coreset"] = f"{got['coreset']} of {got['bank']}"
                    if check is not None:
                        mine = {"pre_default": normalise(load_input([r.image for r in test_rows[:4]], "tv256", 256),
                                                         backbones[256]),
                                "pre_crop": normalise(load_input([r.image for r in test_rows[:4]], "tv256crop", 224),
                                                      backbones[224])}
                        result["preprocessor_check_max_abs"] = {k: float((mine[k] - got[k]).abs().max())
                                                                for k in mine}
            result["per_category"][cat] = res
            print(f"{cat}: {len(train)} train, {len(test_rows)} test ({int(labels.sum())} defect) in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    names = [n for n in [*var, *(PEERS if args.peer_python else {})]]
    result["mean"] = {n: {f: {k: round(float(np.mean([result["per_category"][c][n][f][k] for c in cats])), 4)
                              for k in KEYS}
                          for f in frames if all(f in result["per_category"][c][n] for c in cats)}
                      for n in names}
    report(result, cats, names, frames)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def report(result: dict, cats: list[str], names: list[str], frames: dict) -> None:
    if "preprocessor_check_max_abs" in result:
        print("replica of anomalib's pre-processor vs its own (max abs, normalised):",
              result["preprocessor_check_max_abs"])
    main_rows = [n for n in ("ours", "peer", "peer on our input", "ours crop", "peer crop") if n in names]
    for f in frames:
        print(f"\nframe {f} (image AUROC / pixel AUROC / AUPRO), per category")
        print(f"{'':>28} " + " ".join(f"{c:>22}" for c in cats) + f" {'mean':>22}")
        for n in main_rows:
            if f not in result["mean"][n]:
                continue
            cells = [result["per_category"][c][n][f] for c in cats] + [result["mean"][n][f]]
            print(f"{n:>28} " + " ".join(f"{m['image_auroc']:.3f}/{m['pixel_auroc']:.3f}/{m['pixel_aupro']:.3f}".rjust(22)
                                          for m in cells))
    print("\nmean over categories (image AUROC / pixel AUROC / AUPRO) per frame")
    print(f"{'':>34} " + " ".join(f"{f:>22}" for f in frames))
    for n in names:
        cells = [result["mean"][n].get(f) for f in frames]
        print(f"{n:>34} " + " ".join((f"{m['image_auroc']:.4f}/{m['pixel_auroc']:.4f}/{m['pixel_aupro']:.4f}"
                                      if m else "-").rjust(22) for m in cells))


if __name__ == "__main__":
    main()
