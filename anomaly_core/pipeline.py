"""The pipeline's stages and exactly which params each one reads.

`stage_configs(params)` turns the validated params.yaml into one resolved subset per stage (written by the
`validate` stage to `data/config/<stage>.json`). Every other stage reads only its file, and DVC hashes that
file as a dependency, so a stage re-runs exactly when a value it reads changed, `dvc.lock` records that value,
and a key a stage forgot to declare is an error naming it (never a silent built-in default).

Derived values sit next to the params they come from: `methods` (the selection, in registry order) with the
registry facts later stages need (`roles` and `holdouts` for fuse, `transductive` for evaluate, so they import
no method code), `enabled` (AA-CLIP's training stages), and the feature branches the selected methods need
(`backbones` of features.json holds only those).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

from anomaly_core.config import section
from anomaly_core.errors import ConfigError
from anomaly_core.methods import get_method, method_names, ordered

BRANCHES = ("visual", "clip")

FIXED: dict[str, tuple[str, ...]] = {
    "demo_data": ("demo_seed", "data.demo"),
    "prepare": ("seed", "shots", "task", "data"),
    # hashes the files params name (data.root, weights files, aaclip.train_data.root); backbones added below
    "fingerprint": ("seed", "data"),
    "features": ("task", "features"),
    # aaclip.scoring is read by score@aaclip only
    "train_text_adapter": ("task", "seed", "data.image_size", "backbones.clip", "aaclip.holdout_fraction",
                           "aaclip.train_data", "aaclip_text"),
    "train_image_adapter": ("task", "seed", "data.image_size", "backbones.clip", "aaclip.holdout_fraction",
                            "aaclip.train_data", "aaclip_image"),
    "fuse": ("task", "seed", "data.image_size", "fusion"),
    "classify": ("task", "seed", "data.val_fraction", "classification", "backbones.clip"),
    "evaluate": ("task", "data.image_size", "data.val_fraction", "evaluate", "threshold"),  # threshold: the review page
    # the bundle records the backbones it scores with (and, added below, every method's score params);
    # `threshold` / `export` choose on val
    "export": ("task", "seed", "data", "features", "backbones", "export", "threshold"),
}


def subset(params: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The nested dict holding only `keys` (dotted) of `params`; a missing key is a ConfigError naming it."""
    out: dict[str, Any] = {}
    for dotted in keys:
        value = copy.deepcopy(section(params, dotted))
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def selected_methods(params: dict[str, Any]) -> list[str]:
    """`methods` in registry order; an empty list or an unknown name is a ConfigError naming the key."""
    names = section(params, "methods")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"methods={names!r}: a non-empty list of method names (known: {', '.join(method_names())})")
    try:
        return ordered(names)
    except ConfigError as exc:
        raise ConfigError(f"methods: {exc}") from None


def needed_branches(params: dict[str, Any], methods: list[str]) -> list[str]:
    """Feature branches to extract: those the selected methods read (every configured one for classification)."""
    configured = [b for b in BRANCHES if b in section(params, "backbones")]
    if section(params, "task") == "classification":
        return configured
    want = {b for m in methods for b in get_method(m).branches(params)}
    missing = sorted(want - set(configured))
    if missing:
        raise ConfigError(f"backbones.{missing[0]}: missing, but the selected methods read the {missing[0]} branch")
    return [b for b in configured if b in want]


def stage_name(kind: str, method: str) -> str:
    """File stem of a per-method stage's config: `fit-knn`, `score-knn` (DVC calls the stages fit@knn, score@knn)."""
    return f"{kind}-{method}"


def stage_configs(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{stage file stem: the resolved params that stage reads}. See the module docstring."""
    methods = selected_methods(params)
    task = section(params, "task")
    out = {name: subset(params, keys) for name, keys in FIXED.items()
           if not name.startswith("train_")}
    branches = needed_branches(params, methods)
    out["features"]["backbones"] = {b: copy.deepcopy(section(params, f"backbones.{b}")) for b in branches}
    out["fingerprint"]["backbones"] = copy.deepcopy(out["features"]["backbones"])  # the weights that are loaded
    aaclip = task == "anomaly" and "aaclip" in methods
    out["fingerprint"]["aaclip"] = {"train_data": copy.deepcopy(section(params, "aaclip.train_data")) if aaclip
                                    else {"format": ""}}
    for name in ("train_text_adapter", "train_image_adapter"):
        enabled = task == "anomaly" and "aaclip" in methods
        out[name] = {**subset(params, FIXED[name]), "enabled": True} if enabled else {"task": task, "enabled": False}
    out["fuse"].update(methods=methods, roles={m: get_method(m).role for m in methods},
                       holdouts={m: section(params, get_method(m).holdout) for m in methods if get_method(m).holdout})
    out["evaluate"].update(methods=methods, seed=section(params, "seed"), holdouts=out["fuse"]["holdouts"],
                           transductive=[m for m in methods if get_method(m).transductive],
                           baselines={m: get_method(m).baseline for m in methods
                                      if get_method(m).baseline in methods})
    out["export"].update(methods=methods, holdouts=out["fuse"]["holdouts"])
    if "clip" not in branches:  # classification reads the CLIP text tower only when CLIP features exist
        out["classify"].pop("backbones")
    fcfg = section(params, "fusion")
    clip_methods = [m for m in methods if out["fuse"]["roles"][m] == "clip"]
    if fcfg["visual_method"] not in methods or not clip_methods:
        out["fuse"]["skip"] = (f"needs fusion.visual_method ({fcfg['visual_method']}) and a CLIP-branch method among "
                               f"the selected methods {methods}")
    for m in methods:
        method = get_method(m)
        out[stage_name("fit", m)] = {"task": task, "method": m, **subset(params, method.reads("fit"))}
        if method.fit is None:  # the stage only marks its outputs (decided here, so it starts without torch)
            how = f"trained by the {' and '.join(method.trained_by)} stages" if method.trained_by else "training-free"
            out[stage_name("fit", m)]["skip"] = f"{m}: no fit ({how})"
        out[stage_name("score", m)] = {"task": task, "method": m, **subset(params, method.reads("score"))}
    tiling = section(params, "tiling") if "tiling" in params else None
    if tiling and tiling.get("enabled"):  # only then: the default path's configs (and DVC's hashes) stay as they were
        if "visual" in branches:
            out["features"]["tiling"] = copy.deepcopy(tiling)
        for m in methods:  # a tiling method on the CLIP branch (musc.branch: clip) reads no tiles
            if get_method(m).tiles and "visual" in get_method(m).branches(params):
                out[stage_name("score", m)]["tiling"] = copy.deepcopy(tiling)
                if get_method(m).fit is not None:  # it trains on the tiles too (VPT-kNN)
                    out[stage_name("fit", m)]["tiling"] = copy.deepcopy(tiling)
    # the bundle of any method carries the params its score stage reads (predict runs that same code)
    out["export"]["score"] = {m: copy.deepcopy(out[stage_name("score", m)]) for m in methods}
    return out


def check_params(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate the whole params file (every error at once: `ConfigErrors`), check the backbones the selected
    methods need without building them, and return the per-stage configs."""
    from anomaly_core.backbones import check_backbone
    from anomaly_core.config import BackboneConfig, ConfigErrors, build
    from anomaly_core.validation import default_schema, validate_params

    errors = validate_params(params, default_schema(method_names()))
    if errors:
        raise ConfigErrors(errors)
    configs = stage_configs(params)
    for branch, raw in configs["features"]["backbones"].items():
        cfg = build(BackboneConfig, raw, f"backbones.{branch}", strict=True)
        check_backbone(f"backbones.{branch}", cfg.name, cfg.pretrained, cfg.levels, cfg.image_size)
    return configs
