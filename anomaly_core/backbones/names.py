"""Which library knows a backbone name, without importing torch, timm or open_clip (the `validate` stage).

- open_clip: its model names are the stems of the JSON configs in its package's `model_configs/` folder (and in
  ours, `configs/`); `open_clip_configs()` reads those files the way open_clip's own registry does, without
  importing the library.
- timm: its names are registered in Python code, so `timm_names.json` (next to this file) lists
  `timm.list_models()` for one timm version. It is used only while the installed timm has that version
  (`importlib.metadata`); otherwise, and for any name in neither list, the libraries are imported and asked, as
  before. `tests/test_backbones.py` checks both lists against the installed libraries, so a stale list fails
  there; regenerate it with
  `python -c "from anomaly_core.backbones.names import write_timm_names; write_timm_names()"`.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from anomaly_core.errors import ConfigError

TINY_CLIP = "anomaly-core-tiny-clip"
CONFIG_DIR = Path(__file__).parent / "configs"   # the project's open_clip configs (the tiny demo CLIP)
TIMM_NAMES = Path(__file__).parent / "timm_names.json"
_registered = False


def register_configs() -> None:
    """Make the project's shipped open_clip configs (e.g. the tiny demo CLIP) known to open_clip (imports it)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_configs(folder: Path, into: dict[str, dict[str, Any]]) -> None:
    """open_clip's `_rescan_model_configs` on one folder: a JSON file with embed_dim, vision_cfg and text_cfg."""
    for path in folder.glob("*.json"):
        cfg = json.loads(path.read_text())
        if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            into[path.stem] = cfg


@functools.cache
def open_clip_configs() -> dict[str, dict[str, Any]] | None:
    """{open_clip model name: its config} as `open_clip.list_models()` / `get_model_config` give them once our
    configs are registered; None when open_clip's config folder cannot be found (then ask the library)."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    if not folders or not folders[0].is_dir():
        return None
    configs: dict[str, dict[str, Any]] = {}
    _read_configs(folders[0], configs)
    _read_configs(CONFIG_DIR, configs)  # registered after open_clip's own: ours win a shared name
    return configs


@functools.cache
def timm_names() -> frozenset[str] | None:
    """`timm.list_models()` from timm_names.json, or None when the installed timm is not the version it lists."""
    if not TIMM_NAMES.is_file():
        return None
    listed = json.loads(TIMM_NAMES.read_text())
    if listed.get("timm") != _installed("timm"):
        return None
    return frozenset(listed["models"])


def is_open_clip_name(name: str) -> bool:
    configs = open_clip_configs()
    if configs is not None:
        return name in configs
    import open_clip

    register_configs()
    return name in open_clip.list_models()


def is_timm_name(name: str) -> bool:
    """`timm.list_models(name)` is not empty (a listed name is, without importing timm; a pattern asks timm)."""
    names = timm_names()
    if names is not None and name in names:
        return True
    import timm

    return bool(timm.list_models(name))


def resolve_name(name: str, key: str = "backbone") -> tuple[str, str]:
    """`name` -> ("open_clip" | "timm", model name); ConfigError naming `key` when neither library knows it."""
    if name.startswith("open_clip:"):
        return "open_clip", name.split(":", 1)[1]
    if name.startswith("timm:"):
        return "timm", name.split(":", 1)[1]
    if is_open_clip_name(name):
        return "open_clip", name
    if not is_timm_name(name):
        raise ConfigError(f"{key}={name!r}: unknown backbone, not an open_clip model config nor a timm model name "
                          f"(e.g. {TINY_CLIP}, ViT-L-14-336, efficientnet_lite0)")
    return "timm", name


def open_clip_vision(model: str) -> dict[str, Any]:
    """The `vision_cfg` of an open_clip model config ({} when it has none), read from the files when listed."""
    configs = open_clip_configs()
    if configs is not None and model in configs:
        return dict(configs[model].get("vision_cfg", {}))
    import open_clip

    register_configs()
    return (open_clip.get_model_config(model) or {}).get("vision_cfg", {})


def write_timm_names(path: Path = TIMM_NAMES) -> int:
    """Write `timm.list_models()` of the installed timm to `path` (temp + rename); returns the count."""
    import timm

    names = sorted(timm.list_models())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"timm": _installed("timm"), "models": names}, indent=0) + "\n")
    tmp.replace(path)
    return len(names)
