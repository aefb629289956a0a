"""Peer side of the zero-shot check: anomalib 2.7.0 WinClipModel (runs in the anomalib venv).

Reads {arch, weights (an open_clip state-dict file both sides load), config_dir (extra open_clip model configs, e.g.
the project's tiny demo CLIP, read as data), class_name, images [N, 3, S, S] normalised}. WinClipModel builds its CLIP
from module constants BACKBONE / PRETRAINED: they are pointed at the architecture and the local weights file (no
network), the official code itself runs unmodified. Writes the prompt lists, token ids, per-prompt text embeddings,
the two ensemble embeddings, image / patch embeddings, anomalib's class_scores on the image embedding and on the
projected patch tokens, and WinCLIP's zero-shot outputs (window-aggregated map on the patch grid, pred_score,
upsampled anomaly_map)."""
import sys

import open_clip
import torch
from open_clip.tokenizer import tokenize

from anomalib.models.image.winclip import prompting, torch_model
from anomalib.models.image.winclip.utils import class_scores

inp = torch.load(sys.argv[1])
if inp.get("config_dir"):
    open_clip.add_model_config(inp["config_dir"])
torch_model.BACKBONE, torch_model.PRETRAINED = inp["arch"], inp["weights"]
out = {"normal_states": prompting.NORMAL_STATES, "anomalous_states": prompting.ANOMALOUS_STATES,
       "templates": prompting.TEMPLATES, "temperature": torch_model.TEMPERATURE, "per_class": {}}
model = None
with torch.no_grad():
    for cls, images in inp["images"].items():
        if model is None:
            model = torch_model.WinClipModel(class_name=cls).eval()
        else:
            model.setup(cls)
        normal, anomalous = prompting.create_prompt_ensemble(cls)
        res = {"normal": normal, "anomalous": anomalous, "text_embeddings": model.text_embeddings.clone()}
        if inp.get("text_details", True):
            tokens = tokenize(normal + anomalous)
            res.update(tokens=tokens, prompt_embeddings=model.clip.encode_text(tokens))
        image_emb, window_emb, patch_emb = model.encode_image(images)
        image_scores = class_scores(image_emb, model.text_embeddings, model.temperature, target_class=1)
        zs_grid = model._compute_zero_shot_scores(image_scores, window_emb)  # [N, gh, gw] before upsampling
        pred = model(images)
        res.update(image_embeddings=image_emb, image_scores=image_scores, zero_shot_grid=zs_grid,
                   pred_score=pred.pred_score, anomaly_map=pred.anomaly_map)
        if inp.get("text_details", True):
            patch_proj = patch_emb @ model.clip.visual.proj  # open_clip returns the tokens after ln_post, unprojected
            res.update(patch_embeddings=patch_proj,
                       patch_scores=class_scores(patch_proj, model.text_embeddings, model.temperature, target_class=1))
        out["per_class"][cls] = res
torch.save(out, sys.argv[2])
