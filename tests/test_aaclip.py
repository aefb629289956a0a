"""AA-CLIP adapters, losses and prompts on the tiny random CLIP (plus one ViT-L-14-336 shape check)."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from anomaly_core.backbones import create_backbone, preprocess
from anomaly_core.errors import ConfigError, DataError, WeightsError
from anomaly_core.kit.losses import dice_loss, focal_loss, orthogonal_loss, seg_loss
from anomaly_core.kit.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, build_prompts
from anomaly_core.methods.aaclip import api as A

TINY = "anomaly-core-tiny-clip"
SIZE = 224  # model input
MASK = 56  # mask / loss resolution (data.image_size may differ from the backbone's input size)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster when other jobs share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_backbone(TINY, None, [1, 2, 3, 4])


@pytest.fixture(scope="module")
def synthetic():
    """6 images uint8 [6, 224, 224, 3] (4 with a bright square defect), masks [6, 56, 56], labels, names."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    images, masks = [], []
    for i in range(6):
        img = (100 + 30 * np.sin(xx / 5.0 + i))[:, :, None] * np.array([1.0, 0.9, 0.8]) + rng.normal(0, 4, (SIZE, SIZE, 3))
        mask = np.zeros((SIZE, SIZE), bool)
        if i < 4:
            y, x = rng.integers(5, SIZE // 4 - 20, 2) * 4
            mask[y:y + 56, x:x + 56] = True
            img[mask] = 250
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(mask.reshape(MASK, 4, MASK, 4).any(axis=(1, 3)))
    labels = torch.tensor([1, 1, 1, 1, 0, 0])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)).float(), labels, ["metal_nut"] * 6


@pytest.fixture(scope="module")
def cached(tiny, synthetic):
    """Stage-1 data built the way the features stage caches it (tokens after ln_post + proj, global)."""
    images, masks, _, names = synthetic
    with torch.no_grad():
        out = tiny(preprocess(images, tiny.image_size, tiny.mean, tiny.std))
    return [{"levels": [t.half() for t in out["levels"]], "global": out["global"].half(), "masks": masks,
             "class_name": names[0]}]


# ------------------------------------------------------------------------------------------ prompts
def test_prompt_ensemble_sizes_and_names():
    assert (len(NORMAL_STATES), len(ABNORMAL_STATES), len(TEMPLATES)) == (6, 10, 7)
    normal, abnormal = build_prompts("metal_nut")
    assert len(normal) == 42 and len(abnormal) == 70
    assert "a photo of a metal nut." in normal and all("_" not in p for p in normal + abnormal)
    assert "a cropped photo of the damaged metal nut." in abnormal


# ------------------------------------------------------------------------------------------ losses
def test_focal_loss_hand_values():
    probs = torch.tensor([[[[0.8, 0.4]], [[0.2, 0.6]]]])  # [1, 2, 1, 2]: pixel 0 normal, pixel 1 abnormal
    mask = torch.tensor([[[[0.0, 1.0]]]])
    expected = (-(0.2 ** 2) * math.log(0.8) - (0.4 ** 2) * math.log(0.6)) / 2
    assert focal_loss(probs, mask, smooth=0.0).item() == pytest.approx(expected, rel=1e-6)
    weighted = (-0.25 * 0.2 ** 2 * math.log(0.8) - 0.75 * 0.4 ** 2 * math.log(0.6)) / 2
    assert focal_loss(probs, mask, alpha=[0.25, 0.75], smooth=0.0).item() == pytest.approx(weighted, rel=1e-6)
    s = 1e-5  # AA-CLIP's default smoothing: target clamped to [s, 1-s], pt + s
    pts = [0.8 * (1 - s) + 0.2 * s + s, 0.6 * (1 - s) + 0.4 * s + s]
    smoothed = sum(-(1 - p) ** 2 * math.log(p) for p in pts) / 2
    assert focal_loss(probs, mask).item() == pytest.approx(smoothed, rel=1e-5)
    assert focal_loss(probs, mask, gamma=0.0, smooth=0.0).item() == pytest.approx(
        -(math.log(0.8) + math.log(0.6)) / 2, rel=1e-6)


def test_dice_seg_and_orthogonal_hand_values():
    pred = torch.tensor([[[0.5, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # [2, 2, 2]
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    d0 = (2 * 1.5 + 1) / (1.5 + 2 + 1)  # sample 0; sample 1 (all empty) has dice 1
    assert dice_loss(pred, target).item() == pytest.approx(1 - (d0 + 1) / 2, rel=1e-6)
    probs = torch.stack([1 - pred, pred], dim=1)  # [2, 2, 2, 2]
    expected = focal_loss(probs, target[:, None]) + dice_loss(1 - pred, 1 - target) + dice_loss(pred, target)
    assert seg_loss(probs, target[:, None]).item() == pytest.approx(expected.item(), rel=1e-6)
    assert seg_loss(probs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    anchors = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.0, 1.0]]])  # [C=2, 2, E=2]
    assert orthogonal_loss(anchors).item() == pytest.approx(((0.6 + 1.0) / 2) ** 2)
    bee = torch.randn(3, 8, 2)  # AA-CLIP layout [B, E, 2]
    assert orthogonal_loss(bee).item() == pytest.approx(((bee[:, :, 0] * bee[:, :, 1]).sum(1).mean() ** 2).item())


# ------------------------------------------------------------------------------------------ adapters
def test_adapter_norm_preservation_and_mix():
    torch.manual_seed(0)
    ad = A.SimpleAdapter(16)
    assert (ad.fc1.in_features, ad.fc1.out_features, ad.fc2.out_features) == (16, 8, 16)
    x = torch.randn(2, 5, 16) * 3
    full = A.mix_adapted(ad, x, 1.0)
    assert torch.allclose(full.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(A.mix_adapted(ad, x, 0.1), 0.1 * full + 0.9 * x, atol=1e-6)
    assert torch.equal(A.mix_adapted(ad, x, 0.0), x)
    text = A.TextAdapters(16, 8, until=2, weight=0.0)
    assert torch.equal(text.hook(0, x), x) and torch.equal(text.hook(1, x), x)
    text = A.TextAdapters(16, 8, until=2, weight=0.1)
    assert not torch.allclose(text.hook(1, x), x) and text.hook(2, x) is x


def test_untrained_text_adapters_reproduce_clip(tiny):
    ids = tiny.tokenize(["a photo of a flawless metal nut.", "broken screw"])
    with torch.no_grad():
        ref = tiny.encode_text(ids)
        assert torch.allclose(A.encode_prompts(tiny, ids), ref, atol=1e-5)  # padding cut off: same result
        text = A.TextAdapters.for_backbone(tiny, until=3, weight=0.0)  # final projection copied from CLIP
        assert torch.allclose(A.encode_prompts(tiny, ids, text), ref, atol=1e-5)
        anchors = A.class_anchors(tiny, None, ["metal_nut", "screw"])
    assert anchors.shape == (2, 2, tiny.embed_dim)
    assert torch.allclose(anchors.norm(dim=-1), torch.ones(2, 2), atol=1e-5)
    assert tiny.model.attn_mask.shape == (77, 77)  # restored after the shortened pass
    assert torch.allclose(anchors[0], tiny.text_anchors(build_prompts("metal_nut")), atol=1e-5)  # zero-shot anchors


def test_adapt_until_is_validated(tiny):
    with pytest.raises(ConfigError, match="aaclip_image.adapt_until"):
        A.ImageAdapters.for_backbone(tiny, until=6)
    with pytest.raises(ConfigError, match="aaclip_text.adapt_until"):
        A.TextAdapters.for_backbone(tiny, until=5)
    with pytest.raises(ConfigError, match="aaclip_image.image_size"):
        A.check_image_size(A.ImageAdapterConfig(), tiny)


def test_maps_shapes_and_ranges():
    torch.manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(2, 16, 8), dim=-1)
    anchors = torch.nn.functional.normalize(torch.randn(2, 2, 8), dim=-1)
    logits = A.similarity_map(tokens, anchors, 4, 32)
    assert logits.shape == (2, 2, 32, 32)
    m = A.test_map(tokens, anchors, 4, 32, sigma=1.0, ksize=3)
    assert m.shape == (2, 32, 32) and 0 <= m.min() and m.max() <= 1
    both = A.test_map([tokens, tokens.flip(1)], anchors, 4, 32, sigma=0.0)
    assert torch.allclose(both, (A.test_map(tokens, anchors, 4, 32, sigma=0) + A.test_map(tokens.flip(1), anchors, 4, 32, sigma=0)) / 2)


# ------------------------------------------------------------------------------------------ stage-1 gradients
def _stage1_inputs(cached):
    d = cached[0]
    levels = [t[:4].float().requires_grad_(True) for t in d["levels"]]
    return levels, d["global"][:4].float(), d["masks"][:4]


def test_stage1_loss_uses_every_level_and_trains_every_text_parameter(tiny, cached):
    levels, glob, masks = _stage1_inputs(cached)
    torch.manual_seed(0)
    text = A.TextAdapters.for_backbone(tiny, until=3, weight=0.1)
    anchors = A.class_anchors(tiny, text, ["metal_nut"]).expand(4, -1, -1)  # [B, 2, E]
    loss, parts = A.text_stage_loss(levels, glob, masks, anchors, tiny.grid, 0.1)
    loss.backward()
    for j, t in enumerate(levels):
        assert t.grad is not None and t.grad.abs().sum() > 0, f"level {j} gets no gradient"
    for name, p in text.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"text adapter parameter {name} gets no gradient"
    assert parts["orth"] > 0


def test_stage1_loss_is_a_sum_over_levels_not_an_overwrite(tiny, cached):
    levels, glob, masks = _stage1_inputs(cached)
    levels = [t.detach() for t in levels]
    with torch.no_grad():
        base = A.class_anchors(tiny, None, ["metal_nut"]).expand(4, -1, -1).contiguous()

    def grad_of(level_ids, weight=0.1):
        a = base.clone().requires_grad_(True)
        loss, _ = A.text_stage_loss([levels[j] for j in level_ids], glob, masks, a, tiny.grid, weight)
        loss.backward()
        return a.grad

    full = grad_of(range(len(levels)))
    # only level k live, the other levels' maps detached: what the seed's overwrite bug computes for k = last
    only = [grad_of([k], 0.0) for k in range(len(levels))]
    orth = grad_of([], 0.1)
    assert torch.allclose(full, sum(only) + orth, rtol=1e-4, atol=1e-6)
    buggy = only[-1] + orth
    assert not torch.allclose(full, buggy, rtol=1e-2, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in only)


# ------------------------------------------------------------------------------------------ stage-2 gradients
def test_stage2_loss_trains_every_image_parameter(tiny, synthetic):
    images, masks, labels, names = synthetic
    with torch.no_grad():
        anchors = A.class_anchors(tiny, None, ["metal_nut"]).expand(2, -1, -1)
    torch.manual_seed(0)
    image = A.ImageAdapters.for_backbone(tiny, until=4, weight=0.1)
    assert (len(image.layer_adapters), len(image.seg_proj)) == (4, 4)
    x = preprocess(images[[0, 4]], tiny.image_size, tiny.mean, tiny.std)
    seg, det = image(tiny, x)
    assert [t.shape for t in seg] == [(2, tiny.grid ** 2, tiny.embed_dim)] * 4 and det.shape == (2, tiny.embed_dim)
    assert torch.allclose(det.norm(dim=-1), torch.ones(2), atol=1e-5)
    loss, _ = A.image_stage_loss(seg, det, anchors, masks[[0, 4]], labels[[0, 4]], tiny.grid)
    loss.backward()
    for name, p in image.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"image adapter parameter {name} gets no gradient"
    assert not any(p.grad is not None for p in tiny.parameters())  # the backbone stays frozen


def test_augmentation_moves_image_and_mask_together(synthetic):
    images, masks, _, _ = synthetic
    gen = torch.Generator().manual_seed(3)
    x, m = A.augment_batch(images[:4], masks[:4], 224, (0.0,) * 3, (1.0,) * 3, gen, enabled=True)
    assert x.shape == (4, 3, 224, 224) and m.shape == (4, MASK, MASK) and set(m.unique().tolist()) <= {0.0, 1.0}
    bright = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4)[:, 0]  # [4, 56, 56]
    for b in range(4):
        inside, outside = bright[b][m[b] > 0].mean(), bright[b][m[b] == 0].mean()
        assert inside > outside + 0.2  # the bright square stays under its (flipped / rotated) mask


# ------------------------------------------------------------------------------------------ training
def test_train_text_adapters_reduces_loss(tiny, cached):
    cfg = A.TextAdapterConfig(epochs=3, batch_size=3, lr=1e-3, adapt_until=2)
    text, anchors, history = A.train_text_adapters(tiny, cached, cfg, progress=False)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert anchors.shape == (1, 2, tiny.embed_dim)
    assert torch.allclose(anchors.norm(dim=-1), torch.ones(1, 2), atol=1e-5)
    assert len(text.layer_adapters) == 2 and not text.training


def test_train_image_adapters_reduces_loss_and_selects_on_val(tiny, synthetic):
    with torch.no_grad():
        anchors = {"metal_nut": A.class_anchors(tiny, None, ["metal_nut"])[0]}
    cfg = A.ImageAdapterConfig(epochs=3, batch_size=2, accum_steps=2, lr=1e-3, adapt_until=2, image_size=224)
    image, history = A.train_image_adapters(tiny, anchors, synthetic, synthetic, cfg, progress=False)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert all(h["val_pixel_auroc"] is not None for h in history)
    chosen = [h for h in history if h.get("selected")]
    assert len(chosen) == 1 and chosen[0]["epoch"] > 0
    assert chosen[0]["val_pixel_auroc"] == max(h["val_pixel_auroc"] for h in history[1:])
    assert not image.training
    scores, maps = A.score_images(tiny, image, anchors, synthetic[0], synthetic[3], cfg, out_size=64, batch_size=4)
    assert scores.shape == (6,) and maps.shape == (6, 64, 64)
    assert 0 <= scores.min() and scores.max() <= 1 and 0 <= maps.min() and maps.max() <= 1


def test_score_images_without_image_adapters(tiny, synthetic):
    with torch.no_grad():
        anchors = {"metal_nut": A.class_anchors(tiny, None, ["metal_nut"])[0]}
    cfg = A.ImageAdapterConfig(image_size=224, image_weight=1.0)
    scores, maps = A.score_images(tiny, None, anchors, synthetic[0][:3], synthetic[3][:3], cfg)
    assert scores.shape == (3,) and maps.shape == (3, 224, 224)  # out_size defaults to the input size
    with torch.no_grad():
        out = tiny(preprocess(synthetic[0][:3], 224, tiny.mean, tiny.std))
        g = torch.nn.functional.normalize(out["global"], dim=-1)
        expected = A.det_probability(g, anchors["metal_nut"].expand(3, -1, -1))
    assert torch.allclose(scores, expected, atol=1e-5)  # image_weight 1: the global-embedding probability


def test_score_images_official_scoring_is_test_py_over_the_whole_call(tiny, synthetic):
    """aaclip.scoring official: raw-logit maps and (det . abnormal + 1) / 2, min-max normalised over every image of
    the call (not per batch), image score 0.5 max(map) + 0.5 image."""
    with torch.no_grad():
        anchors = {"metal_nut": A.class_anchors(tiny, None, ["metal_nut"])[0]}
    cfg = A.ImageAdapterConfig(image_size=224)
    images, names = synthetic[0], synthetic[3]
    s4, m4 = A.score_images(tiny, None, anchors, images, names, cfg, out_size=64, batch_size=4, scoring="official")
    s6, m6 = A.score_images(tiny, None, anchors, images, names, cfg, out_size=64, batch_size=6, scoring="official")
    assert torch.allclose(s4, s6, atol=1e-6) and torch.allclose(m4, m6, atol=1e-6)
    assert float(m4.min()) == pytest.approx(0.0, abs=1e-6) and float(m4.max()) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        seg, det = A.encode_images(tiny, None, preprocess(images, 224, tiny.mean, tiny.std))
        a = anchors["metal_nut"].expand(6, -1, -1)
        raw = sum(A.similarity_map(t, a, tiny.grid, 64) for t in seg)  # [6, 2, 64, 64] logits (align_corners=True)
    image = ((det * a[:, 1]).sum(-1) + 1) / 2
    image = (image - image.min()) / (image.max() - image.min())
    assert torch.allclose(s4, 0.5 * image + 0.5 * m4.flatten(1).max(1).values, atol=1e-5)
    # without blur the map is the min-max of the summed (l_abnormal + 1 - l_normal) / 2 of the upsampled logits
    flat = A.ImageAdapterConfig(image_size=224, sigma=0.0)
    _, m0 = A.score_images(tiny, None, anchors, images, names, flat, out_size=64, scoring="official")
    want = (raw[:, 1] + len(seg) - raw[:, 0]) / 2
    assert torch.allclose(m0, (want - want.min()) / (want.max() - want.min()), atol=1e-4)
    with pytest.raises(ConfigError, match="aaclip.scoring"):
        A.score_images(tiny, None, anchors, images, names, cfg, scoring="paper")


def test_official_scoring_is_not_exportable():
    from anomaly_core.deploy.bundle import BundleInputs
    from anomaly_core.deploy.generic import write_bundle
    from anomaly_core.methods import get_method

    m = get_method("aaclip")
    assert m.unexportable({"aaclip": {"scoring": "softmax"}}) == ""
    params = {"score": {"aaclip": {"aaclip": {"scoring": "official"}}}, "backbones": {}}
    with pytest.raises(ConfigError, match="aaclip.scoring=official"):
        write_bundle(BundleInputs([], None, None, params, "aaclip"), None, {})


def test_train_text_adapters_on_dpam_tokens(tiny, cached, synthetic):
    """aaclip_text.dpam: every batch's image tokens are the DPAM tokens of that batch's images (dpam.dpam_levels),
    not the cache: the untrained loss (history[0], batches in order) is recomputed by hand from them."""
    from anomaly_core.methods.aaclip.dpam import dpam_levels

    images, masks = synthetic[0], cached[0]["masks"]
    data = [{**cached[0], "images": images}]
    cfg = A.TextAdapterConfig(epochs=1, batch_size=3, lr=1e-3, adapt_until=2, dpam=True, dpam_layer=4)
    _, _, hist = A.train_text_adapters(tiny, data, cfg, progress=False)
    _, _, plain = A.train_text_adapters(tiny, cached, A.TextAdapterConfig(epochs=0, batch_size=3, adapt_until=2),
                                        progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        ta = A.TextAdapters.for_backbone(tiny, 2, 0.1, "project")
    with torch.no_grad():
        anchors = A.class_anchors(tiny, ta, ["metal_nut"]).expand(3, -1, -1)
        total = 0.0
        for idx in ([0, 1, 2], [3, 4, 5]):
            lv = dpam_levels(tiny.model.visual, preprocess(images[idx], 224, tiny.mean, tiny.std), tiny.levels, 4)
            glob = cached[0]["global"][idx].float()
            total += 3 * float(A.text_stage_loss(lv, glob, masks[idx], anchors, tiny.grid, 0.1)[0])
    assert hist[0]["loss"] == pytest.approx(total / 6, rel=1e-5)
    assert abs(hist[0]["loss"] - plain[0]["loss"]) > 1e-3 * plain[0]["loss"]  # not the cached tokens
    with pytest.raises(ConfigError, match="aaclip_text.dpam_layer=6"):
        A.train_text_adapters(tiny, data, A.TextAdapterConfig(epochs=0, dpam=True, dpam_layer=6), progress=False)
    with pytest.raises(DataError, match="aaclip_text.dpam"):
        A.train_text_adapters(tiny, cached, A.TextAdapterConfig(epochs=0, dpam=True, dpam_layer=4), progress=False)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_and_refusals(tiny, tmp_path):
    torch.manual_seed(0)
    text = A.TextAdapters.for_backbone(tiny, until=2)
    image = A.ImageAdapters.for_backbone(tiny, until=3)
    anchors = torch.nn.functional.normalize(torch.randn(2, 2, tiny.embed_dim), dim=-1)
    A.save_text_adapters(tmp_path / "text.pt", text, anchors, ["a", "b"], TINY)
    A.save_image_adapters(tmp_path / "image.pt", image, TINY, history=[{"epoch": 1, "val_pixel_auroc": None}])
    text2, by_class = A.load_text_adapters(tmp_path / "text.pt", tiny, TINY)
    image2 = A.load_image_adapters(tmp_path / "image.pt", tiny, TINY)
    for a, b in [(text, text2), (image, image2)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert text2.until == 2 and image2.until == 3 and torch.equal(by_class["b"], anchors[1])

    with pytest.raises(WeightsError, match="architecture"):
        A.load_image_adapters(tmp_path / "image.pt", tiny, "ViT-L-14-336")
    with pytest.raises(WeightsError, match="aaclip_text"):
        A.load_image_adapters(tmp_path / "text.pt", tiny, TINY)
    wrong = A.ImageAdapters(tiny.width * 2, tiny.embed_dim, 4, until=3)  # e.g. a wider backbone's adapters
    A.save_image_adapters(tmp_path / "wide.pt", wrong, TINY)
    with pytest.raises(WeightsError, match="shape"):
        A.load_image_adapters(tmp_path / "wide.pt", tiny, TINY)
    two_levels = create_backbone(TINY, None, [2, 4])
    with pytest.raises(WeightsError, match="levels"):
        A.load_image_adapters(tmp_path / "image.pt", two_levels, TINY)
    from anomaly_core.io import write_skipped  # a skipped stage's output is refused with its reason

    write_skipped(tmp_path / "skipped.pt", "method aaclip not selected (params.yaml: methods)")
    with pytest.raises(WeightsError, match="skipped .method aaclip not selected"):
        A.load_text_adapters(tmp_path / "skipped.pt", tiny, TINY)


# ------------------------------------------------------------------------------------------ ViT-L shapes
def test_vit_l_14_336_shapes_with_default_adapters():
    """One no-grad forward of ViT-L-14-336 (random weights) with AA-CLIP's default adapters."""
    start = time.perf_counter()
    torch.manual_seed(0)
    big = create_backbone("ViT-L-14-336", None, [6, 12, 18, 24])
    built = time.perf_counter()
    text = A.TextAdapters.for_backbone(big, until=3, weight=0.1)
    image = A.ImageAdapters.for_backbone(big, until=6, weight=0.1)
    x = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        seg, det = image(big, x)
        anchors = A.class_anchors(big, text, ["metal_nut"])
    assert [tuple(t.shape) for t in seg] == [(1, 576, 768)] * 4
    assert tuple(det.shape) == (1, 768) and tuple(anchors.shape) == (1, 2, 768)
    assert (len(text.layer_adapters), len(image.layer_adapters), image.layer_adapters[0].fc1.out_features) == (3, 6, 512)
    total = time.perf_counter() - start
    print(f"ViT-L-14-336: build {built - start:.1f}s, adapters + forward + anchors {total - (built - start):.1f}s")
    assert total < 120, f"ViT-L shape check took {total:.0f}s"
