"""Peer side of the AA-CLIP check (runs in the peer venv with the Mwxinnn/AA-CLIP checkout on PYTHONPATH).

Reads {weights: path of the seeded random ViT-L-14-336 state dict, images [B, 3, 336, 336] normalised,
masks [B, 1, 336, 336] 0/1, labels [B], class_name (an MVTec class), seed, text_lr, image_lr, work (scratch dir)}.
Builds the official model as train.py does (model/clip.py create_model twice: one plain, one after
visual.DAPM_replace(20) for stage 1's patch features; AdaptedCLIP with train.py's default args, relu off),
loads the same backbone weights into both, then writes:
  init_text / init_image    the official xavier-initialised adapter state dicts (seeded), which our side loads
  token_ids                 official tokenizer on the official prompts (PROMPTS x templates) of class_name
  text_emb                  AdaptedCLIP.encode_text(token_ids)                       [T, 768]
  anchors0                  get_adapted_single_class_text_embedding before training   [768, 2]
  plain_levels / plain_cls  clip_model.encode_image(image, [6, 12, 18, 24]) tokens after ln_post @ proj, CLS
  surgery_levels / cls      stage 1's inputs as train_text_adapter computes them (DPAM model), unnormalised
  text_loss                 train_text_adapter's logged loss of its one step (one batch, one epoch)
  text_grad / text_after    text adapter gradients after that step / parameters after the Adam step
  seg0 / det0               AdaptedCLIP.forward(image) with the initial image adapters
  anchors1                  anchors after the text step (stage 2's frozen text embeddings)
  image_loss / image_grad / image_after   the same for train_image_adapter's one step.
The official training functions are called as they are, on a one-batch list standing in for the DataLoader;
their per-epoch logged mean loss is captured from the logger (one batch: the loss of that step)."""
import logging
import sys
import types

import torch

# the checkout imports ipdb (debugger, unused) and pkg_resources.packaging (setuptools); stand-ins, no code change
sys.modules.setdefault("ipdb", types.ModuleType("ipdb"))
if "pkg_resources" not in sys.modules:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging
        import packaging.version  # noqa: F401
        stub = types.ModuleType("pkg_resources")
        stub.packaging = packaging
        sys.modules["pkg_resources"] = stub

from dataset.constants import PROMPTS, REAL_NAMES  # noqa: E402
from forward_utils import calculate_seg_loss, calculate_similarity_map  # noqa: E402
from forward_utils import get_adapted_single_class_text_embedding  # noqa: E402
from model.adapter import AdaptedCLIP  # noqa: E402
from model.adapter_modules import SimpleAdapter, SimpleProj  # noqa: E402
from model.clip import create_model, load_checkpoint  # noqa: E402
from model.tokenizer import tokenize  # noqa: E402
from train import train_image_adapter, train_text_adapter  # noqa: E402

torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
inp = torch.load(sys.argv[1])
out = {}

# small, architecture-free part (kept as the regression fixture): the official modules at small widths on given
# weights; forward_utils' similarity map + seg loss (focal + 2 dice) on small seeded tensors; the stage-1 per-level
# loss and the stage-2 loss composed as train.py composes them (its loop lines around those official functions).
if "small" in inp:
    sm = inp["small"]
    with torch.no_grad():
        ad = SimpleAdapter(sm["x"].shape[-1], sm["x"].shape[-1])
        ad.fc[0].weight.copy_(sm["w_adapter"])
        pr = SimpleProj(sm["x"].shape[-1], sm["w_proj"].shape[0], relu=True)
        pr.fc[0].weight.copy_(sm["w_proj"])
        pn = SimpleProj(sm["x"].shape[-1], sm["w_proj"].shape[0], relu=False)
        pn.fc.weight.copy_(sm["w_proj"])
        size, text, m = sm["masks"].shape[-1], sm["text"], sm["masks"]
        probs = calculate_similarity_map(sm["patch"], text, size)
        cls_token = sm["global"] / sm["global"].norm(dim=-1, keepdim=True)
        orth = ((text[:, :, 0] * text[:, :, 1]).sum(1).mean()) ** 2
        per_level = []
        for t in sm["levels"]:   # train_text_adapter's loop body, one value per level
            f = t / t.norm(dim=-1, keepdim=True) + cls_token.unsqueeze(1)
            per_level.append(calculate_seg_loss(calculate_similarity_map(f, text, size), m) + orth * 0.1)
        seg_levels = [t / t.norm(dim=-1, keepdim=True) for t in sm["levels"]]
        image_loss = torch.nn.functional.cross_entropy(torch.matmul(sm["det"].unsqueeze(1), text)[:, 0],
                                                       sm["labels"])   # train_image_adapter's loss
        for f in seg_levels:
            image_loss = image_loss + calculate_seg_loss(calculate_similarity_map(f, text, size), m)
        out["small"] = {"adapter": ad(sm["x"]), "proj_relu": pr(sm["x"]), "proj": pn(sm["x"]), "probs": probs,
                        "seg_loss": calculate_seg_loss(probs, m), "text_loss_per_level": torch.stack(per_level),
                        "orth": orth, "image_loss": image_loss,
                        "test_map": calculate_similarity_map(sm["patch"], text, size, test=True, domain="Industrial")}
        # DPAM tokens of a small official VisionTransformer (model/transformer.py) on our seeded state dict, as
        # train_text_adapter computes them: encode_image's out_layers, ln_post(t[:, 1:]) @ proj
        if "dpam" in sm:
            from model.transformer import VisionTransformer
            dp = sm["dpam"]
            vit = VisionTransformer(**dp["config"], patch_dropout=0.0).eval()
            vit.load_state_dict(dp["state"])
            _, plain = vit(dp["images"], dp["levels"])
            vit.DAPM_replace(DPAM_layer=dp["dpam_layer"])
            _, tok = vit(dp["images"], dp["levels"])
            _, tok1 = vit(dp["images"][:1], dp["levels"])   # the first image alone: its tokens depend on the batch
            def project(ts):
                return [vit.ln_post(t[:, 1:, :]) @ vit.proj for t in ts]
            out["small"]["dpam"] = {"plain": project(plain), "tokens": project(tok), "first_alone": project(tok1)}
        # test.py's scoring: get_predictions on a stand-in model returning the given seg levels and det token, then
        # metrics_eval's normalisation lines (min-max over the set, 0.5 max map + 0.5 image) and metrics_eval itself
        if "scoring" in sm:
            from forward_utils import metrics_eval
            from test import get_predictions
            sc = sm["scoring"]
            n = len(sc["det"])
            batch = {"image": torch.zeros(n, 3, 1, 1), "mask": sc["masks"], "label": sc["labels"],
                     "file_name": [f"{i}.png" for i in range(n)], "class_name": [inp.get("class_name", "bottle")] * n}
            masks_np, labels_np, preds, preds_image = get_predictions(
                lambda image: (sc["levels"], sc["det"]), sc["text"], [batch], "cpu", sc["masks"].shape[-1],
                dataset="MVTec")[:4]
            pix = (preds - preds.min()) / (preds.max() - preds.min()) if preds.max() != 1 else preds
            img = ((preds_image - preds_image.min()) / (preds_image.max() - preds_image.min())
                   if preds_image.max() != 1 else preds_image)
            out["small"]["scoring"] = {"raw_maps": torch.from_numpy(preds), "raw_image": torch.from_numpy(preds_image),
                                       "maps": torch.from_numpy(pix),
                                       "image": torch.from_numpy(pix.max(axis=(1, 2)) * 0.5 + img * 0.5),
                                       "metrics": metrics_eval(masks_np, labels_np, preds, preds_image, "bottle",
                                                               domain="Industrial")}
    if inp.get("small_only"):
        torch.save(out, sys.argv[2])
        sys.exit(0)


work, name = inp["work"], inp["class_name"]
images, masks, labels = inp["images"], inp["masks"], inp["labels"]


def build():
    m = create_model(model_name="ViT-L-14-336", img_size=336, device="cpu", pretrained=None)
    load_checkpoint(m, inp["weights"])
    return m.eval()


clip_surgery = build()
clip_surgery.visual.DAPM_replace(DPAM_layer=20)   # train.py --surgery_until_layer default
clip_model = build()
torch.manual_seed(inp["seed"])
model = AdaptedCLIP(clip_model=clip_model, text_adapt_weight=0.1, image_adapt_weight=0.1, text_adapt_until=3,
                    image_adapt_until=6, relu=False).eval()   # train.py: relu=args.relu, store_true (off)
out["init_text"] = {k: v.clone() for k, v in model.text_adapter.state_dict().items()}
out["init_image"] = {k: v.clone() for k, v in model.image_adapter.state_dict().items()}

real = REAL_NAMES["MVTec"][name]
prompts = [[t.format(s.format(real)) for s in PROMPTS[k] for t in PROMPTS["prompt_templates"]]
           for k in ("prompt_normal", "prompt_abnormal")]
out["prompts"] = prompts
out["token_ids"] = tokenize(prompts[0] + prompts[1])
with torch.no_grad():
    out["text_emb"] = model.encode_text(out["token_ids"])
    out["anchors0"] = get_adapted_single_class_text_embedding(model, "MVTec", name, "cpu")
    # the backbone path without surgery (what a frozen CLIP feature cache holds)
    cls, levels = clip_model.encode_image(images, [6, 12, 18, 24])
    out["plain_cls"] = cls
    out["plain_levels"] = [clip_model.visual.ln_post(t[:, 1:, :]) @ clip_model.visual.proj for t in levels]
    # stage 1's inputs, the lines of train_text_adapter (before normalisation)
    _, sl = clip_surgery.encode_image(images, [6, 12, 18, 24])
    out["surgery_levels"] = [clip_surgery.visual.ln_post(t[:, 1:, :]) @ clip_surgery.visual.proj for t in sl]
    out["cls"] = model.clipmodel.encode_image(images, [])[0]
    seg0, det0 = model(images)
    out["seg0"], out["det0"] = seg0, det0


class Grab(logging.Handler):
    def __init__(self):
        super().__init__()
        self.losses = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("loss: "):
            self.losses.append(float(msg[len("loss: "):]))


logger = logging.getLogger("peer_aaclip")
logger.setLevel(logging.INFO)
grab = Grab()
logger.addHandler(grab)
batch = {"image": images, "mask": masks, "label": labels, "class_name": [name] * len(images)}

text_opt = torch.optim.Adam(model.text_adapter.parameters(), lr=inp["text_lr"], betas=(0.5, 0.999))
train_text_adapter(adapted_model=model, clip_surgery=clip_surgery, text_norm_weight=0.1, train_loader=[batch],
                   optimizer=text_opt, device="cpu", start_epoch=0, save_path=work, text_epoch=1,
                   dataset_name="MVTec", img_size=images.shape[-1], logger=logger)
out["text_loss"] = grab.losses[-1]
out["text_grad"] = {k: p.grad.clone() for k, p in model.text_adapter.named_parameters()}
out["text_after"] = {k: v.clone() for k, v in model.text_adapter.state_dict().items()}

with torch.no_grad():
    anchors1 = get_adapted_single_class_text_embedding(model, "MVTec", name, "cpu")
out["anchors1"] = anchors1
image_opt = torch.optim.Adam(model.image_adapter.parameters(), lr=inp["image_lr"], betas=(0.5, 0.999))
sched = torch.optim.lr_scheduler.MultiStepLR(image_opt, milestones=[16000, 32000], gamma=0.5)
train_image_adapter(model=model, text_embeddings={name: anchors1}, train_loader=[batch], optimizer=image_opt,
                    scheduler=sched, device="cpu", start_epoch=0, save_path=work, image_epoch=1,
                    img_size=images.shape[-1], logger=logger)
out["image_loss"] = grab.losses[-1]
out["image_grad"] = {k: p.grad.clone() for k, p in model.image_adapter.named_parameters()}
out["image_after"] = {k: v.clone() for k, v in model.image_adapter.state_dict().items()}
torch.save(out, sys.argv[2])
