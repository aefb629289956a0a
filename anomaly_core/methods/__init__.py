"""The method registry: one line per method, `name -> module` (the module defines `METHOD`).

Order matters: it is the report order and, among CLIP-branch methods, the fusion's preference on ties.
Modules are imported on demand, so a stage that runs one method imports only that method's code.
"""
from __future__ import annotations

import importlib

from anomaly_core.errors import ConfigError

REGISTRY: dict[str, str] = {
    "aaclip": "anomaly_core.methods.aaclip",
    "prompt_clip": "anomaly_core.methods.prompt_clip",
    "multi_prototype": "anomaly_core.methods.multi_prototype",
    "zero_shot_clip": "anomaly_core.methods.zero_shot_clip",
    "image_prototype": "anomaly_core.methods.image_prototype",
    "knn": "anomaly_core.methods.knn",
    "vpt_knn": "anomaly_core.methods.vpt_knn",
    "musc": "anomaly_core.methods.musc",
}


def method_names() -> list[str]:
    """Every registered method, in registry order."""
    return list(REGISTRY)


def get_method(name: str):
    """The `Method` registered as `name`; an unknown name lists the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}' (known: {', '.join(REGISTRY)})")
    return importlib.import_module(REGISTRY[name]).METHOD


def ordered(names) -> list[str]:
    """`names` in registry order (unknown names raise)."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown method '{unknown[0]}' (known: {', '.join(REGISTRY)})")
    return [n for n in REGISTRY if n in set(names)]
