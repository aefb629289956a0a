"""MuSc vs xrli-U/MuSc (models/modules/_LNAMD.py, _MSM.py, _RsCIN.py, the sequence of models/musc.py).

Same seeded patch tokens (4 layers, CLS first, as open_clip's ViT returns them) and CLS features on both sides:
the LNAMD features per (r, layer), the MSM scores on the official features (so MSM is compared alone), the
patch scores after the layer / r means, the image scores and the RsCIN re-scored image scores."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import Ctx, Row, git_commit, row, run_peer

N, G, E, LAYERS = 10, 6, 16, 4       # 10 images: 9 others -> 0.3 * 9 = 2.7 (floor and round differ)
R_LIST, TOPMIN, K_LIST = [1, 3, 5], 0.3, [1, 2, 3]   # the official MVTec AD settings


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, 1 + G * G, E, generator=g)
    tokens = [base + 0.5 * torch.randn(N, 1 + G * G, E, generator=g) + l for l in range(LAYERS)]
    cls = F.normalize(torch.randn(N, E, generator=g), dim=-1)
    return {"tokens": tokens, "cls": cls, "r_list": R_LIST, "topmin": TOPMIN, "k_list": K_LIST}


def check(ctx: Ctx) -> list[Row]:
    from anomaly_core.methods.musc import clip_patch_scores, musc_clip_levels
    from anomaly_core.methods.musc.mutual import mutual_scores, rescore

    repo = ctx.repos["musc"]
    src = f"xrli-U/MuSc@{git_commit(repo)[:12]}"
    inp = inputs()
    torch.save(inp, ctx.work / "musc_in.pt")
    off = run_peer(ctx, "peer_musc.py", repo, ctx.work / "musc_in.pt", ctx.work / "musc_out.pt")
    levels = [t[:, 1:] for t in inp["tokens"]]          # our CLIP store keeps the grid tokens, no CLS
    rows: list[Row] = []
    ctx.save_fixture("musc", {"inputs": inp, "official": off}, note=(
        f"made by scripts/fidelity/run.py --only musc --fixtures tests/fixtures/fidelity: seeded tokens "
        f"(check_musc.inputs, seed 0) through the official {src} modules (peer_musc.py)"))

    # LNAMD: our per-level descriptors for each r vs the official (r, layer) features
    ours_l, theirs_l = [], []
    for r in R_LIST:
        per_level = musc_clip_levels(levels, G, r)       # [layers] x [N, g, g, E]
        for l in range(LAYERS):
            ours_l.append(per_level[l].reshape(N, G * G, E))
            theirs_l.append(off["lnamd"][(r, l)])
    rows.append(row("musc", src, f"LNAMD features, r in {R_LIST}, {LAYERS} layers", torch.stack(ours_l),
                    torch.stack(theirs_l)))

    # MSM alone, on the official features
    ours_m = torch.stack([mutual_scores(off["lnamd"][k].reshape(N, G, G, E), TOPMIN).reshape(N, -1)
                          for k in off["msm"]])
    rows.append(row("musc", src, f"MSM + interval mean (topmin {TOPMIN}, {N} images)", ours_m,
                    torch.stack(list(off["msm"].values()))))

    # the whole patch-score sequence of our CLIP branch (official: MSM per layer, mean over layers, then over r)
    patch = clip_patch_scores(levels, G, R_LIST, TOPMIN).reshape(N, -1)
    rows.append(row("musc", src, "patch scores of the CLIP branch (mean over layers and r)", patch, off["patch"],
                    notes="intentional: musc.branch visual (the demo's CNN maps) aggregates levels as PatchCore "
                          "does, without LNAMD's layer norm; maps are smoothed (musc.sigma 4) before the max "
                          "(official: none); rescore_k default [2, 3] (official MVTec [1, 2, 3])"))

    # RsCIN on the official image scores and CLS features; the official min-max normalises the scores first
    s = off["image"].double()
    s01 = (s - s.min()) / (s.max() - s.min())
    rows.append(row("musc", src, f"RsCIN image scores (k {K_LIST}, min-max scores)", rescore(s01.float(), inp["cls"],
                    K_LIST), off["rscin"]))
    return rows
