"""Peer side of the CoOp check: FuNz-0/PromptAD (runs in the anomalib venv with the checkout on PYTHONPATH).

Reads {arch, weights (open_clip state-dict file), class_name, n_ctx, n_pro, n_ctx_ab, n_pro_ab, normal_ctx, abnormal_ctx,
feature_map [B, L, E] (normalised patch features), lr, momentum, weight_decay, lambda1}. Builds PromptAD's vendored
open_clip (PromptAD.CLIPAD.create_model, fp32, the weights file) and its PromptLearner (PromptAD/model.py), sets the
context vectors, runs PromptLearner.forward + PromptAD.encode_text_embedding's call (model.encode_text_embeddings)
for its three prompt groups. The loss lines of train_seg.fit (v2t cross-entropy, TripletLoss(margin 0), the
abnormal matching term) are re-stated here verbatim on the given feature map (fit() itself needs a dataloader and
PromptAD's modified image tower), then one SGD step (train_seg's optimiser settings) on the prompt learner."""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from PromptAD import CLIPAD, TripletLoss
from PromptAD import model as pm

inp = torch.load(sys.argv[1])
if inp.get("config_dir"):
    CLIPAD.add_model_config(inp["config_dir"])
clip = CLIPAD.create_model(inp["arch"], pretrained=inp["weights"], precision="fp32").eval()
pl = pm.PromptLearner(inp["n_ctx"], inp["n_pro"], inp["n_ctx_ab"], inp["n_pro_ab"], inp["class_name"], clip, "fp32")
with torch.no_grad():
    pl.normal_ctx.copy_(inp["normal_ctx"])
    pl.abnormal_ctx.copy_(inp["abnormal_ctx"])
cls = pm.class_mapping.get(inp["class_name"], inp["class_name"])
states = pm.state_anomaly + pm.class_state_abnormal[inp["class_name"]]
texts = {"normal": [" ".join(["N"] * inp["n_ctx"]) + " " + cls + "." for _ in range(inp["n_pro"])],
         "abnormal_handle": [" ".join(["N"] * inp["n_ctx"]) + " " + s.format(cls) + "." for s in states
                             for _ in range(inp["n_pro"])],
         "abnormal_learned": [" ".join(["N"] * inp["n_ctx"]) + " " + " ".join(["A"] * inp["n_ctx_ab"]) + " " + cls + "."
                              for _ in range(inp["n_pro_ab"]) for _ in range(inp["n_pro"])]}
feature_map = inp["feature_map"]
opt = torch.optim.SGD(pl.parameters(), lr=inp["lr"], momentum=inp["momentum"], weight_decay=inp["weight_decay"])
criterion, criterion_tip = nn.CrossEntropyLoss(), TripletLoss(margin=0.0)

# ---- train_seg.fit's loss, line for line (model.encode_text_embedding == clip.encode_text_embeddings)
normal_text_prompt, abnormal_text_prompt_handle, abnormal_text_prompt_learned = pl()
opt.zero_grad()
normal_text_features = clip.encode_text_embeddings(normal_text_prompt, pl.tokenized_normal_prompts)
abnormal_text_features_handle = clip.encode_text_embeddings(abnormal_text_prompt_handle, pl.tokenized_abnormal_prompts_handle)
abnormal_text_features_learned = clip.encode_text_embeddings(abnormal_text_prompt_learned, pl.tokenized_abnormal_prompts_learned)
abnormal_text_features = torch.cat([abnormal_text_features_handle, abnormal_text_features_learned], dim=0)
raw = {"normal": normal_text_features.detach().clone(), "abnormal_handle": abnormal_text_features_handle.detach().clone(),
       "abnormal_learned": abnormal_text_features_learned.detach().clone()}
mean_ad_handle = torch.mean(F.normalize(abnormal_text_features_handle, dim=-1), dim=0)
mean_ad_learned = torch.mean(F.normalize(abnormal_text_features_learned, dim=-1), dim=0)
loss_match_abnormal = (mean_ad_handle - mean_ad_learned).norm(dim=0) ** 2.0
normal_text_features_ahchor = normal_text_features.mean(dim=0).unsqueeze(0)
normal_text_features_ahchor = normal_text_features_ahchor / normal_text_features_ahchor.norm(dim=-1, keepdim=True)
abnormal_text_features_ahchor = abnormal_text_features.mean(dim=0).unsqueeze(0)
abnormal_text_features_ahchor = abnormal_text_features_ahchor / abnormal_text_features_ahchor.norm(dim=-1, keepdim=True)
abnormal_text_features = abnormal_text_features / abnormal_text_features.norm(dim=-1, keepdim=True)
l_pos = torch.einsum('nic,cj->nij', feature_map, normal_text_features_ahchor.transpose(0, 1))
l_neg_v2t = torch.einsum('nic,cj->nij', feature_map, abnormal_text_features.transpose(0, 1))
logit_scale = clip.logit_scale  # fp32 branch of train_seg (its `logit_scalef` is a typo there; fp16 uses .half())
logits_v2t = torch.cat([l_pos, l_neg_v2t], dim=-1) * logit_scale
target_v2t = torch.zeros([logits_v2t.shape[0], logits_v2t.shape[1]], dtype=torch.long)
loss_v2t = criterion(logits_v2t.transpose(1, 2), target_v2t)
trip_loss = criterion_tip(feature_map, normal_text_features_ahchor, abnormal_text_features_ahchor)
loss = loss_v2t + trip_loss + loss_match_abnormal * inp["lambda1"]
loss.backward()
grads = {"normal_ctx": pl.normal_ctx.grad.clone(), "abnormal_ctx": pl.abnormal_ctx.grad.clone()}
opt.step()
torch.save({"texts": texts, "tokens": {"normal": pl.tokenized_normal_prompts,
                                       "abnormal_handle": pl.tokenized_abnormal_prompts_handle,
                                       "abnormal_learned": pl.tokenized_abnormal_prompts_learned},
            "features": raw, "anchors": torch.cat([normal_text_features_ahchor, abnormal_text_features_ahchor]).detach(),
            "logit_scale": float(clip.logit_scale),
            "loss": {"v2t": float(loss_v2t), "triplet": float(trip_loss), "match": float(loss_match_abnormal),
                     "total": float(loss)},
            "grads": grads, "after_step": {"normal_ctx": pl.normal_ctx.detach().clone(),
                                           "abnormal_ctx": pl.abnormal_ctx.detach().clone()}}, sys.argv[2])
