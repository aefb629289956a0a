"""Validation of a whole params file at once, before any expensive stage runs.

`validate_params(params, schema)` builds every section of `schema` strictly (no hidden defaults: a missing
key is an error), checks the top-level scalars (seed, shots, task, demo_seed, methods) and the cross-key
rules, and returns ALL problems as one line each (`<dotted key>=<value>: <what is allowed>`), never only the
first. `resolve_params` does the same and returns the typed configs (for the per-stage resolved JSON), or
raises one `ConfigErrors` listing every problem.

The schema is data: `Schema(sections={dotted section: Section(config class, inject=(fields...))},
methods=[known method names] | None, rules=[...])`. `inject` names the fields that are filled from the
top-level param of the same name (every trained method's `seed` comes from the top-level `seed`), so they
must not appear in the section itself. `default_schema()` describes today's params.yaml.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from anomaly_core.config import ConfigErrors, build_errors

__all__ = ["Section", "Schema", "validate_params", "resolve_params", "default_schema", "DEFAULT_RULES",
           "TASKS", "rule_same_value"]

TASKS = ("anomaly", "classification")
Configs = dict[str, Any]  # dotted section -> built config, or None when the section has errors
Rule = Callable[[dict[str, Any], Configs], list[str]]


@dataclass(frozen=True)
class Section:
    cls: type
    inject: tuple[str, ...] = ()  # fields taken from the top-level param of the same name (e.g. "seed")


@dataclass
class Schema:
    sections: dict[str, Section]
    methods: Sequence[str] | None = None  # the registry's method names; None = params have no `methods` key
    rules: list[Rule] = field(default_factory=list)
    scalars: tuple[str, ...] = ("seed", "shots", "task", "demo_seed")
    renamed: dict[str, str] = field(default_factory=dict)  # old top-level section name -> its new name


# ---------------------------------------------------------------------------- top-level scalars


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar_errors(params: dict[str, Any], schema: Schema) -> list[str]:
    errors = []
    checks = {
        "seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
        "demo_seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
        "shots": (lambda v: v == "all" or (_int(v) and v > 0), "a positive integer or 'all'"),
        "task": (lambda v: v in TASKS, f"one of {list(TASKS)}"),
    }
    for key in schema.scalars:
        ok, allowed = checks[key]
        if key not in params:
            errors.append(f"{key}: missing key (every key must be set in params.yaml, where the defaults live)")
        elif not ok(params[key]):
            errors.append(f"{key}={params[key]!r}: {allowed}")
    if schema.methods is not None:
        known = list(schema.methods)
        value = params.get("methods")
        if "methods" not in params:
            errors.append(f"methods: missing key (a list of method names out of {known})")
        elif not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
            errors.append(f"methods={value!r}: a non-empty list of method names out of {known}")
        else:
            errors += [f"methods: unknown method {m!r} (known: {', '.join(known)})" for m in value if m not in known]
            dup = sorted({m for m in value if value.count(m) > 1})
            if dup:
                errors.append(f"methods={value!r}: listed twice: {', '.join(dup)}")
    return errors


# ---------------------------------------------------------------------------- structure


def _node(params: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _unknown_keys(params: dict[str, Any], schema: Schema) -> list[str]:
    """Keys of params.yaml that no section, parent of a section or scalar accounts for (typos like `knnn`)."""
    tree: dict[str, set[str]] = {"": set(schema.scalars) | ({"methods"} if schema.methods is not None else set())}
    for dotted in schema.sections:
        parts = dotted.split(".")
        for i in range(len(parts)):
            tree.setdefault(".".join(parts[:i]), set()).add(parts[i])
    errors = []
    for parent, children in sorted(tree.items()):
        found, node = _node(params, parent) if parent else (True, params)
        if not found or not isinstance(node, dict) or parent in schema.sections:
            continue
        for key in sorted(set(node) - children, key=str):
            where = f"{parent}.{key}" if parent else str(key)
            if not parent and key in schema.renamed:
                errors.append(f"{key}: renamed to {schema.renamed[key]} (rename the section in params.yaml)")
            else:
                errors.append(f"{where}: unknown key (known: {', '.join(sorted(children))})")
    return errors


def _check_all(params: Any, schema: Schema) -> tuple[Configs, list[str]]:
    if not isinstance(params, dict):
        return {}, [f"params.yaml: expected a mapping of sections, got {type(params).__name__}"]
    errors = _scalar_errors(params, schema) + _unknown_keys(params, schema)
    bad_scalars = {e.split("=")[0].split(":")[0] for e in errors}
    configs: Configs = {}
    for dotted, sec in schema.sections.items():
        found, mapping = _node(params, dotted)
        if not found:
            configs[dotted] = None
            if any(new == dotted and old in params for old, new in schema.renamed.items()):
                continue  # said once, as "<old>: renamed to <new>"
            errors.append(f"{dotted}: missing section (every key must be set in params.yaml, where the defaults live)")
            continue
        # a wrong top-level value (seed='abc') is reported once, above; its field keeps the built-in default here
        defaults = {f.name: f.default for f in dataclasses.fields(sec.cls)}
        inject = {k: params[k] if k in params and k not in bad_scalars else defaults[k] for k in sec.inject}
        configs[dotted], section_errors = build_errors(sec.cls, mapping, dotted, strict=True, inject=inject)
        errors += section_errors
    for rule in schema.rules:
        errors += rule(params, configs)
    return configs, errors


def validate_params(params: dict[str, Any], schema: Schema | None = None) -> list[str]:
    """Every problem of `params` against `schema` (default: `default_schema()`), one line each; [] when valid."""
    return _check_all(params, schema or default_schema())[1]


def resolve_params(params: dict[str, Any], schema: Schema | None = None) -> Configs:
    """{dotted section: typed config} with every value set; raises ConfigErrors listing all problems."""
    configs, errors = _check_all(params, schema or default_schema())
    if errors:
        raise ConfigErrors(errors)
    return configs


# ---------------------------------------------------------------------------- cross-key rules


def rule_same_value(a: str, b: str) -> Rule:
    """`a` and `b` (dotted `section.field`) must hold the same value, e.g. two image sizes that must agree."""

    def rule(params: dict[str, Any], configs: Configs) -> list[str]:
        (sa, fa), (sb, fb) = a.rsplit(".", 1), b.rsplit(".", 1)
        ca, cb = configs.get(sa), configs.get(sb)
        if ca is None or cb is None or getattr(ca, fa) == getattr(cb, fb):
            return []
        va, vb = getattr(ca, fa), getattr(cb, fb)
        return [f"{a}={va!r}: must equal {b}={vb!r} (set both to the same value)"]

    return rule


def rule_method_names(params: dict[str, Any], configs: Configs, known: Sequence[str] | None = None) -> list[str]:
    """`fusion.clip_method` / `fusion.visual_method` name known methods (when the caller knows them)."""
    fusion = configs.get("fusion")
    if fusion is None or known is None:
        return []
    errors = []
    if fusion.clip_method != "auto" and fusion.clip_method not in known:
        errors.append(f"fusion.clip_method={fusion.clip_method!r}: 'auto' or one of {list(known)}")
    if fusion.visual_method not in known:
        errors.append(f"fusion.visual_method={fusion.visual_method!r}: one of {list(known)}")
    return errors


def rule_demo_shots(params: dict[str, Any], configs: Configs) -> list[str]:
    """With the demo dataset, `shots` cannot exceed the normal training images it generates."""
    data, shots = configs.get("data"), params.get("shots")
    if data is None or data.format != "demo" or not _int(shots) or shots <= data.demo.n_train:
        return []
    return [f"shots={shots}: the demo has data.demo.n_train={data.demo.n_train} normal training images per category "
            f"(lower shots or raise data.demo.n_train)"]


def rule_export_method(params: dict[str, Any], configs: Configs, known: Sequence[str] | None = None) -> list[str]:
    """`export.method` is `best`, `fusion` or a known method name."""
    export = configs.get("export")
    if export is None or known is None or export.method in ("best", "fusion", *known):
        return []
    return [f"export.method={export.method!r}: 'best', 'fusion' or one of {list(known)}"]


def rule_tiling_stages(params: dict[str, Any], configs: Configs) -> list[str]:
    """`tiling.enabled: true`: every selected method that reads the visual branch must tile (`Method.tiles`: kNN,
    VPT-kNN and MuSc), the tile is the visual backbone's input (`tiling.tile` = `backbones.visual.
    image_size`: tiles are never resized), the tiled kNN's limits (`kit.knn.check_tiled`, on the `knn` section for
    kNN and for VPT-kNN, which scores with it), and one
    features process (`dist.nproc: 1`). One line per problem, naming the method and the key."""
    tiling = configs.get("tiling")
    if tiling is None or not tiling.enabled:
        return []
    from anomaly_core.errors import ConfigError
    from anomaly_core.methods import get_method, method_names

    errors = []
    names = params.get("methods")
    selected = [m for m in names if m in method_names()] if isinstance(names, list) else []
    for name in selected:
        m = get_method(name)
        try:
            reads_visual = "visual" in m.branches(params)
        except ConfigError:  # its branch key is wrong: said by its own section's check
            continue
        if reads_visual and not m.tiles:
            errors.append(f"tiling.enabled=True: method {name} does not tile (it reads the visual branch resized to "
                          f"backbones.visual.image_size); remove {name} from methods or set tiling.enabled: false")
        elif m.tiles:
            cfg = configs.get("knn") if "knn" in m.score_reads else configs.get(m.section)  # VPT-kNN: kNN's section
            if cfg is not None:
                errors.extend(tiling_refusals(name, cfg, tiling))
    visual = configs.get("backbones.visual")
    if visual is not None and visual.image_size != tiling.tile:
        errors.append(f"tiling.tile={tiling.tile}: must equal backbones.visual.image_size={visual.image_size} (the "
                      "backbone sees each tile at its own resolution; set both to the same value)")
    dist = configs.get("dist")
    if dist is not None and dist.nproc != 1:
        errors.append(f"dist.nproc={dist.nproc}: tiled features are extracted by one process (set dist.nproc: 1 "
                      "or tiling.enabled: false)")
    return errors


def tiling_refusals(method: str, cfg: Any, tiling: Any) -> list[str]:
    """The tiled kNN's limits for a tiling method's config (kNN's section): one line each, naming the method."""
    from anomaly_core.errors import ConfigError
    from anomaly_core.kit.knn import KnnConfig, check_tiled

    if not isinstance(cfg, KnnConfig):
        return []
    try:
        check_tiled(cfg, tiling)
    except ConfigError as exc:
        return [f"{exc} (method {method})"]
    return []


def rule_fixed_threshold(params: dict[str, Any], configs: Configs) -> list[str]:
    """`threshold.mode: fixed` needs a named `export.method`: its value is in the unit of one method's scores,
    and with `best` which method (and unit) wins is only known after the run."""
    export, threshold = configs.get("export"), configs.get("threshold")
    if export is None or threshold is None or threshold.mode != "fixed" or export.method != "best":
        return []
    return ["threshold.mode='fixed': needs export.method set to one method (its value is in that method's score "
            "unit), not 'best'; or use threshold.mode f1 / fpr"]


def rule_partial_weights(params: dict[str, Any], configs: Configs) -> list[str]:
    """`backbones.<b>.allow_partial_weights: true` only means something for a local weights file (a package or a hub
    tag is loaded whole or refused; random weights load nothing)."""
    from anomaly_core.weights_spec import EFFNET_LITE0_PACKAGE, is_local_file, is_random

    errors = []
    for branch in ("visual", "clip"):
        cfg = configs.get(f"backbones.{branch}")
        if cfg is None or not cfg.allow_partial_weights:
            continue
        spec = cfg.pretrained
        if is_random(spec) or spec == EFFNET_LITE0_PACKAGE or not is_local_file(spec):
            errors.append(f"backbones.{branch}.allow_partial_weights=True: only for a local weights file "
                          f"(backbones.{branch}.pretrained={spec!r} is not one); set it to false")
    return errors


DEFAULT_RULES: list[Rule] = [
    rule_same_value("aaclip_image.image_size", "backbones.clip.image_size"),
    rule_demo_shots,
    rule_tiling_stages,
    rule_fixed_threshold,
    rule_partial_weights,
]


def default_schema(methods: Sequence[str] | None = None) -> Schema:
    """params.yaml: the pipeline's own sections and every registered method's section (the registry gives its
    config class and whether it takes the top-level `seed`).

    `methods`: the known method names (the registry's); when given, params.yaml must carry a `methods` list
    of them and the fusion's method names are checked against them.
    """
    from anomaly_core.classification import ClassificationConfig
    from anomaly_core.config import BackboneConfig, DataConfig, DistConfig, EvaluateConfig, FeaturesConfig
    from anomaly_core.deploy.export import ExportConfig
    from anomaly_core.deploy.thresholds import ThresholdConfig
    from anomaly_core.fusion import FusionConfig
    from anomaly_core.kit.tiling import TilingConfig
    from anomaly_core.methods import get_method, method_names

    seeded = ("seed",)
    sections = {
        "data": Section(DataConfig),
        "backbones.visual": Section(BackboneConfig),
        "backbones.clip": Section(BackboneConfig),
        "features": Section(FeaturesConfig),
        "evaluate": Section(EvaluateConfig),
        "fusion": Section(FusionConfig),
        "classification": Section(ClassificationConfig),
        "export": Section(ExportConfig),
        "threshold": Section(ThresholdConfig),
        "dist": Section(DistConfig),
        "tiling": Section(TilingConfig),
    }
    methods = method_names() if methods is None else methods
    renamed = {}
    for name in method_names():  # every registered method's sections, selected or not
        m = get_method(name)
        sections[m.section] = Section(m.config, seeded if m.seeded else ())
        for extra, (cls, extra_seeded) in m.sections.items():
            sections[extra] = Section(cls, seeded if extra_seeded else ())
        renamed.update({old: m.section for old in m.renamed})
    rules = list(DEFAULT_RULES) + [lambda p, c: rule_method_names(p, c, methods),
                                   lambda p, c: rule_export_method(p, c, methods)]
    return Schema(sections=sections, methods=methods, rules=rules, renamed=renamed)
