"""Patch kNN with a DINO branch vs dammsi/AnomalyDINO (src/backbones.py masking, src/detection.py scoring,
src/post_eval.py mean_top1p, src/utils.py dists2map) on the same DINO tokens: timm vit_small_patch14_dinov2 with
seeded random weights (torch.manual_seed(0), pretrained off) at 224 px, last block after the final norm (what
AnomalyDINO's get_intermediate_layers(n=1) returns), 2 demo washer train images as references, 2 test images.

Our kNN is PatchCore's (compared in check_knn.py), not AnomalyDINO: no foreground masking, local 3x3 aggregation,
Euclidean distance of unnormalised descriptors, PatchCore re-weighted image score. The rows show where the two agree
(the exact nearest-neighbour distance on L2-normalised tokens without aggregation) and measure the rest."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common import Ctx, Row, diff, git_commit, row, run_peer

NAME, SIZE, N_REF, SEED = "vit_small_patch14_dinov2", 224, 2, 0


def tokens(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> DINOv2 patch tokens [N, P, D] (timm, seeded random weights, final norm, CLS dropped)."""
    import timm

    from anomaly_core.backbones import preprocess

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = timm.create_model(NAME, pretrained=False, img_size=SIZE).eval()
    x = preprocess(images, SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        out = model.forward_features(x)  # [N, 1 + P, D], normed
    return out[:, model.num_prefix_tokens:]


def check(ctx: Ctx) -> list[Row]:
    from check_winclip import _demo, _test_set

    from anomaly_core.config import build
    from anomaly_core.features import load_resized
    from anomaly_core.kit.knn import KnnConfig, knn_search, score_patches
    from anomaly_core.kit.maps import to_image_maps
    from anomaly_core.kit.patches import cnn_patches

    repo = ctx.repos["anomalydino"]
    src = f"dammsi/AnomalyDINO@{git_commit(repo)[:12]}"
    demo = _demo(ctx.work / "demo")
    train = sorted((demo / "washer" / "train" / "good").glob("*.png"))[:N_REF]
    ref_imgs = torch.from_numpy(np.stack([load_resized(str(p), SIZE) for p in train]))
    imgs, _, labels = _test_set(demo, "washer", SIZE)
    pick = [int(np.flatnonzero(labels == 0)[0]), int(np.flatnonzero(labels == 1)[0])]
    tok = tokens(torch.cat([ref_imgs, imgs[pick]])).half().float()  # float16-exact: the fixture stores them so
    ref, test = tok[:N_REF], tok[N_REF:]
    g = SIZE // 14
    inp = {"ref": ref, "test": test, "grid": (g, g), "size": SIZE}
    torch.save(inp, ctx.work / "dino_in.pt")
    off = run_peer(ctx, "peer_dino.py", repo, ctx.work / "dino_in.pt", ctx.work / "dino_out.pt")
    rows: list[Row] = []
    # 1. the shared part: 1 - cos to the nearest reference patch == (squared L2 of unit vectors) / 2
    bank = F.normalize(ref.reshape(-1, ref.shape[-1]), dim=-1)
    d2, _ = knn_search(F.normalize(test.reshape(-1, test.shape[-1]), dim=-1), bank, 1)
    rows.append(row("knn", src, "patch distances on the same DINOv2 tokens, masking off (our exact search on "
                    "L2-normalised tokens, no aggregation: d^2 / 2 = 1 - cos)", (d2[:, 0] / 2).reshape(test.shape[:2]),
                    off["patch"]["unmasked"], notes="AnomalyDINO's faiss IndexFlatL2 stood in by an exact torch search "
                    "in the peer (faiss is not in the peer venv)"))
    maps = to_image_maps((d2[:, 0] / 2).reshape(-1, g, g), SIZE, 4.0)
    rows.append(row("knn", src, "anomaly maps (bilinear upsampling + Gaussian sigma 4; AnomalyDINO: cv2 INTER_LINEAR "
                    "+ scipy gaussian_filter)", maps, off["map"]["unmasked"], tol=1e-3,
                    notes="scipy truncates the kernel at 4 sigma like ours; both reflect the border"))
    # 2. masking: ours has none
    kept = [float(m.float().mean()) for m in off["mask_ref"] + off["mask_test"]]
    rows.append(Row("knn", src, "zero-shot foreground masking (PCA first component > 10, centre check, dilate / "
                    "close)", None, None, 0.0, None, (
                        f"by design ours keeps every patch: AnomalyDINO keeps {', '.join(f'{k:.0%}' for k in kept)} "
                        f"of the {g * g} patches of the 2 reference + 2 test washer images here (random weights); "
                        f"masked image scores {', '.join(f'{v:.4f}' for v in off['image']['masked'])} vs unmasked "
                        f"{', '.join(f'{v:.4f}' for v in off['image']['unmasked'])}")))
    # 3. image score and our PatchCore-style defaults on the same tokens
    k = int(g * g * 0.01)
    flat = (d2[:, 0] / 2).reshape(test.shape[:2])
    ours_top = flat.topk(max(k, 1), dim=1).values.mean(1) if k else flat.max(1).values
    rows.append(row("knn", src, f"image score mean of the top 1% patch distances ({max(k, 1)} of {g * g}; "
                    "int(1% P) = 0 -> max, as mean_top1p)", ours_top, off["image"]["unmasked"],
                    notes="ours (knn.image_score topk_mean) averages the top 1% of the smoothed pixel map instead"))
    cfg = build(KnnConfig, {}, "knn")
    grid_ref = cnn_patches([ref.transpose(1, 2).reshape(N_REF, -1, g, g)], cfg.patch_aggregate, cfg.patch_pad)
    grid_test = cnn_patches([test.transpose(1, 2).reshape(test.shape[0], -1, g, g)], cfg.patch_aggregate, cfg.patch_pad)
    bank_o = grid_ref.reshape(-1, grid_ref.shape[-1])
    img_o, map_o = score_patches(grid_test, bank_o, cfg, SIZE, lambda q, kk: knn_search(q, bank_o, kk))
    c = np.corrcoef(map_o.flatten().numpy(), off["map"]["unmasked"].flatten().numpy())[0, 1]
    a, r = diff(map_o, off["map"]["unmasked"])
    rows.append(Row("knn", src, "our kNN defaults (3x3 aggregation, Euclidean, re-weighted image score) on the same "
                    "tokens vs AnomalyDINO", a, r, 0.0, None, (
                        f"by design: map Pearson r {c:.3f} with AnomalyDINO's (scales differ: L2 vs cosine distance); "
                        f"image scores ours {', '.join(f'{v:.3f}' for v in img_o)} (good, defect) vs AnomalyDINO "
                        f"{', '.join(f'{v:.4f}' for v in off['image']['unmasked'])}; the tokens come from timm "
                        f"directly ({NAME} as our visual backbone builds the same maps: tests/test_backbones.py)")))
    if ctx.fixtures is not None:
        ctx.save_fixture("dino", {"inputs": {"ref": ref.half(), "test": test.half(), "grid": (g, g), "size": SIZE},
                                  "official": {"patch": off["patch"]["unmasked"], "image": off["image"]["unmasked"],
                                               "map": off["map"]["unmasked"].float()}},
                         note=(f"made by scripts/fidelity/run.py --only knn --fixtures tests/fixtures/fidelity: {src} "
                               f"(peer_dino.py) on {NAME} tokens (seeded random weights, float16-exact values) of 2 "
                               "demo washer train images (references) and 2 test images (first good, first defect)"))
    return rows
