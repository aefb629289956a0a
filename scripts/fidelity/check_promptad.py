"""CoOp (prompt_clip) vs FuNz-0/PromptAD (PromptAD/model.py PromptLearner, train_seg.py fit), on PromptAD's own
architecture open_clip ViT-B-16-plus-240 with the seeded random weights file of check_winclip (both sides load it),
PromptAD's defaults n_ctx 4, n_pro 1, n_ctx_ab 1, n_pro_ab 4, class 'bottle', seeded context vectors and a seeded
normalised patch-feature map.

Compared where the two share a computation: token ids of PromptAD's prompts, the text features of its prompts with
the same context vectors through our embed_hook path (our PromptLearner.embed_hook + ClipBackbone.encode_text), and
the gradients of PromptAD's training loss w.r.t. both contexts when the loss is evaluated on our text features (so
one optimiser step from the same loss would move the contexts the same way). Not the same by design: the prompt set
(ours: the ensemble's 6 + 10 state phrases behind one shared context; PromptAD: "ctx class." normals, ctx + 11
hand-written abnormal states and learned abnormal contexts), the anchors (ours: normalised mean of normalised prompt
features; PromptAD: normalised mean of raw ones), the loss (ours: class-balanced 2-way CE with val anomalies, on
patches and globals; PromptAD: one-class CE against every abnormal prompt + triplet + abnormal matching) and the
optimiser (ours Adam; PromptAD SGD momentum 0.9, weight decay 5e-4, cosine schedule): those rows report values."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from common import Ctx, Row, diff, git_commit, row, run_peer

ARCH, CLASS, N_CTX, N_PRO, N_CTX_AB, N_PRO_AB = "ViT-B-16-plus-240", "bottle", 4, 1, 1, 4
LR, MOMENTUM, WD, LAMBDA1 = 0.002, 0.9, 0.0005, 0.001
TINY12 = "fidelity-tiny-clip12"
TINY12_CONFIG = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "fidelity" / f"{TINY12}.json"


def inputs(arch: str, weights: str, width: int, embed: int, config_dir: str = "", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"arch": arch, "weights": weights, "config_dir": config_dir,
            "class_name": CLASS, "n_ctx": N_CTX, "n_pro": N_PRO, "n_ctx_ab": N_CTX_AB, "n_pro_ab": N_PRO_AB,
            "normal_ctx": 0.02 * torch.randn(N_PRO, N_CTX, width, generator=g),
            "abnormal_ctx": 0.02 * torch.randn(N_PRO_AB, N_CTX_AB, width, generator=g),
            "feature_map": F.normalize(torch.randn(2, 16, embed, generator=g), dim=-1),
            "lr": LR, "momentum": MOMENTUM, "weight_decay": WD, "lambda1": LAMBDA1}


def promptad_loss(feats: dict, feature_map: torch.Tensor, logit_scale: float, lambda1: float) -> dict:
    """train_seg.fit's loss (FuNz-0/PromptAD) on given text features {normal, abnormal_handle, abnormal_learned}."""
    n, h, l = feats["normal"], feats["abnormal_handle"], feats["abnormal_learned"]
    ab = torch.cat([h, l])
    match = (F.normalize(h, dim=-1).mean(0) - F.normalize(l, dim=-1).mean(0)).norm() ** 2
    na = F.normalize(n.mean(0, keepdim=True), dim=-1)
    aa = F.normalize(ab.mean(0, keepdim=True), dim=-1)
    logits = torch.cat([feature_map @ na.T, feature_map @ F.normalize(ab, dim=-1).T], -1) * logit_scale  # [B, L, 1+A]
    v2t = F.cross_entropy(logits.transpose(1, 2), torch.zeros(logits.shape[:2], dtype=torch.long))
    trip = torch.relu(((feature_map - na) ** 2).sum(1) - ((feature_map - aa) ** 2).sum(1)).mean()
    return {"v2t": v2t, "triplet": trip, "match": match, "total": v2t + trip + lambda1 * match}


def ours(clip, inp: dict, off: dict) -> dict:
    """Our text path on PromptAD's prompts: PromptLearner.embed_hook for the normal / hand-written groups (one
    shared context, as class_specific=False), the same splice for the learned abnormal group (normal ctx + ab ctx)."""
    from anomaly_core.methods.prompt_clip.coop import PromptLearner

    learner = PromptLearner(clip, CLASS, n_ctx=N_CTX)
    nctx = inp["normal_ctx"][0].clone().requires_grad_(True)          # n_pro = 1: one context [n_ctx, W]
    abctx = inp["abnormal_ctx"].clone().requires_grad_(True)          # [n_pro_ab, n_ctx_ab, W]
    learner.ctx = torch.nn.Parameter(nctx)                            # ours: the learnable [n_ctx, W]
    feats = {}
    for key in ("normal", "abnormal_handle"):
        ids = clip.tokenize(off["texts"][key])
        learner.token_ids = ids
        learner.groups = torch.zeros(ids.shape[0], dtype=torch.long)
        feats[key] = clip.encode_text(ids, embed_hook=learner.embed_hook)
    ids = clip.tokenize(off["texts"]["abnormal_learned"])

    def learned_hook(x):  # [T, 77, W]: positions 1..n_ctx normal context, then n_ctx_ab abnormal context
        t = x.shape[0]
        return torch.cat([x[:, :1], learner.ctx.expand(t, -1, -1).to(x.dtype), abctx.reshape(t, N_CTX_AB, -1),
                          x[:, 1 + N_CTX + N_CTX_AB:]], 1)
    feats["abnormal_learned"] = clip.encode_text(ids, embed_hook=learned_hook)
    loss = promptad_loss(feats, inp["feature_map"], off["logit_scale"], LAMBDA1)
    loss["total"].backward()
    return {"learner": learner, "features": {k: v.detach() for k, v in feats.items()}, "loss": loss,
            "grads": {"normal_ctx": learner.ctx.grad[None], "abnormal_ctx": abctx.grad}}


def check(ctx: Ctx) -> list[Row]:
    from anomaly_core.backbones.clip import ClipBackbone
    from anomaly_core.methods.prompt_clip.coop import CoopConfig, coop_loss, state_phrases

    from check_winclip import _weights

    repo = ctx.repos["promptad"]
    src = f"FuNz-0/PromptAD@{git_commit(repo)[:12]}"
    weights = str(_weights(ctx.work / "winclip_vitb16plus240_seed0.pt", ARCH))
    clip = ClipBackbone(ARCH, weights, levels=[12])
    inp = inputs(ARCH, weights, clip.text_width, clip.embed_dim)
    torch.save(inp, ctx.work / "promptad_in.pt")
    off = run_peer(ctx, "peer_promptad.py", repo, ctx.work / "promptad_in.pt", ctx.work / "promptad_out.pt")
    o = ours(clip, inp, off)
    if ctx.fixtures is not None:  # the regression fixture: the same run on a tiny 12-layer CLIP (rebuilt in tests;
        import open_clip          # PromptAD's vision tower reads fixed layers up to 12, the demo CLIP has 4)

        open_clip.add_model_config(TINY12_CONFIG)
        tiny = ClipBackbone(TINY12, "random", levels=[1])
        wpath = ctx.work / "promptad_tiny12_weights.pt"
        torch.save(tiny.model.state_dict(), wpath)
        tin = inputs(TINY12, str(wpath), tiny.text_width, tiny.embed_dim, str(TINY12_CONFIG))
        torch.save(tin, ctx.work / "promptad_tiny_in.pt")
        toff = run_peer(ctx, "peer_promptad.py", repo, ctx.work / "promptad_tiny_in.pt",
                        ctx.work / "promptad_tiny_out.pt")
        ctx.save_fixture("promptad", {"inputs": {k: tin[k] for k in ("normal_ctx", "abnormal_ctx", "feature_map")},
                                      "logit_scale": toff["logit_scale"], "lambda1": LAMBDA1, "n_ctx": N_CTX,
                                      "n_ctx_ab": N_CTX_AB, "class_name": CLASS, "texts": toff["texts"],
                                      "tokens": toff["tokens"], "features": toff["features"],
                                      "loss": toff["loss"], "grads": toff["grads"]}, note=(
            f"made by scripts/fidelity/run.py --only prompt_clip --fixtures tests/fixtures/fidelity: {src} "
            f"(peer_promptad.py: its PromptLearner + train_seg.fit's loss lines) on {TINY12} (tests/fixtures/fidelity/{TINY12}.json) with "
            "ClipBackbone's random weights (rebuilt by the test), seeded contexts / feature map "
            "(check_promptad.inputs, seed 0)"))
    rows: list[Row] = []
    n_ours, a_ours = state_phrases(CLASS)
    rows.append(Row("prompt_clip", src, "prompt construction (class 'bottle')", None, None, 0.0, None, (
        f"by design: ours '{' '.join(['X'] * N_CTX)} <state>.' for {len(n_ours)} normal + {len(a_ours)} abnormal "
        f"state phrases of the zero-shot ensemble, one shared context (or one per class, class_specific); PromptAD "
        f"{len(off['texts']['normal'])} normal '{off['texts']['normal'][0]}', {len(off['texts']['abnormal_handle'])} "
        f"abnormal 'N N N N <state>.' (8 generic + its per-class MVTec/VisA lists, sharing the normal context) and "
        f"{len(off['texts']['abnormal_learned'])} learned '{off['texts']['abnormal_learned'][0]}'; context init: "
        "ours 'a photo of a' embeddings (n_ctx 4), PromptAD N(0, 0.02)")))
    ids = torch.cat([clip.tokenize(off["texts"][k]) for k in off["texts"]]).float()
    rows.append(row("prompt_clip", src, f"token ids of PromptAD's {ids.shape[0]} prompts (its vendored tokenizer)",
                    ids, torch.cat([off["tokens"][k] for k in off["texts"]]).float(), tol=0.0))
    for key in ("normal", "abnormal_handle", "abnormal_learned"):
        rows.append(row("prompt_clip", src, f"text features, {key} prompts, same context vectors (our embed_hook "
                        f"path, {ARCH} seeded random)", o["features"][key], off["features"][key]))
    for k in ("v2t", "triplet", "match", "total"):
        rows.append(row("prompt_clip", src, f"PromptAD loss '{k}' on our text features (same feature map)",
                        o["loss"][k].detach().reshape(1), torch.tensor([off["loss"][k]])))
    for k in ("normal_ctx", "abnormal_ctx"):
        rows.append(row("prompt_clip", src, f"gradient of PromptAD's loss w.r.t. {k} through our text path",
                        o["grads"][k], off["grads"][k]))
    cfg = CoopConfig()
    with torch.no_grad():
        o["learner"].token_ids = clip.tokenize(off["texts"]["normal"] + off["texts"]["abnormal_handle"])
        o["learner"].groups = torch.tensor([0] * len(off["texts"]["normal"]) + [1] * len(off["texts"]["abnormal_handle"]))
        anchors = o["learner"].compute_anchors(clip)
        fm = inp["feature_map"].reshape(-1, clip.embed_dim)
        ours_loss = float(coop_loss(anchors, fm, fm[:0], fm[:0], fm[:0], cfg.temperature))
    a, r = diff(anchors[0], F.normalize(off["anchors"][0], dim=-1))
    rows.append(Row("prompt_clip", src, "loss and step (ours vs PromptAD's) on the same normal feature map",
                    None, None, 0.0, None, (
                        f"by design: PromptAD total {off['loss']['total']:.4f} (v2t {off['loss']['v2t']:.4f} over "
                        f"1 + {len(off['texts']['abnormal_handle']) + len(off['texts']['abnormal_learned'])} text "
                        f"classes at its raw logit_scale {off['logit_scale']:.4f}, i.e. log(1/0.07) un-exponentiated, "
                        f"triplet {off['loss']['triplet']:.4f}, match {off['loss']['match']:.2e} x {LAMBDA1}); ours "
                        f"(balanced 2-way CE, T {cfg.temperature}, normal patches only here) {ours_loss:.4f}; "
                        f"normal anchor on the same prompts: max abs {a:.2e} (ours normalises each prompt first); step: "
                        f"ours Adam lr {cfg.lr}, PromptAD SGD lr {LR} momentum {MOMENTUM} wd {WD} (not compared)")))
    return rows
