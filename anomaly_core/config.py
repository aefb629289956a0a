"""Typed configs built from plain dicts (the stage scripts read params.yaml; the library never does).

`build(cls, mapping, section)` fills a dataclass, refusing unknown keys and values of the wrong type
with a `ConfigError` that names the params.yaml key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from anomaly_core.errors import ConfigError

T = TypeVar("T")


def _check(value: Any, tp: Any, key: str) -> Any:
    """Validate (and lightly coerce int->float) `value` against the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r}: must be one of {list(get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return _check(value, arm, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r}: expected {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        (arm,) = get_args(tp)[:1] or (Any,)
        return [_check(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}={value!r}: expected null")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected {tp.__name__}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r}: expected {tp.__name__}")
    return value


def build(cls: type[T], mapping: dict[str, Any] | None, section: str) -> T:
    """Fill dataclass `cls` from `mapping` (the params.yaml section named `section`)."""
    mapping = mapping or {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{section}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values = {k: _check(v, hints[k], f"{section}.{k}") for k, v in mapping.items()}
    try:
        obj = cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{section}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if validate:
        validate(section)
    return obj


def positive(section: str, **values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{section}.{key}={value}: must be > 0")


@dataclass
class DemoConfig:
    n_train: int = 24
    n_test_good: int = 16
    n_test_defect_per_type: int = 6
    size: int = 256


@dataclass
class DataConfig:
    format: Literal["demo", "mvtec", "visa", "imagefolder"] = "demo"
    root: str = "data/raw"
    categories: Union[str, list[str]] = "all"
    val_fraction: float = 0.4
    image_size: int = 224
    demo: DemoConfig = field(default_factory=DemoConfig)

    def validate(self, section: str) -> None:
        if isinstance(self.categories, str) and self.categories != "all":
            raise ConfigError(f"{section}.categories={self.categories!r}: a list of names or 'all'")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{section}.val_fraction={self.val_fraction}: must be in (0, 1)")
        positive(section, image_size=self.image_size)


@dataclass
class BackboneConfig:
    name: str
    pretrained: str = "random"
    levels: list[int] = field(default_factory=list)
    image_size: int = 224


@dataclass
class FeaturesConfig:
    batch_size: int = 16
    dtype: Literal["float16", "float32"] = "float16"


@dataclass
class KnnConfig:
    branch: Literal["visual", "clip"] = "visual"
    k: int = 1
    patch_aggregate: int = 3
    patch_pad: Literal["exclude", "zeros", "replicate"] = "zeros"
    image_score: Literal["max", "topk_mean", "reweight"] = "reweight"
    top_percent: float = 1.0
    reweight_neighbors: int = 9
    coreset_ratio: float = 1.0
    coreset_dim: int = 128
    sigma: float = 4.0
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    chunk: int = 4096
    max_memory_mb: float = 256.0
    index: Literal["exact", "ivf"] = "exact"
    ivf_lists: int = 0
    ivf_nprobe: int = 8

    def validate(self, section: str) -> None:
        positive(section, k=self.k, top_percent=self.top_percent, coreset_ratio=self.coreset_ratio, chunk=self.chunk,
                 max_memory_mb=self.max_memory_mb, reweight_neighbors=self.reweight_neighbors,
                 coreset_dim=self.coreset_dim, ivf_nprobe=self.ivf_nprobe)
        if self.coreset_ratio > 1:
            raise ConfigError(f"{section}.coreset_ratio={self.coreset_ratio}: must be in (0, 1]")
        if self.ivf_lists < 0:
            raise ConfigError(f"{section}.ivf_lists={self.ivf_lists}: 0 (automatic, 4 sqrt(M)) or a positive count")


@dataclass
class ZeroShotConfig:
    sigma: float = 4.0
    image_weight: float = 0.5
    temperature: float = 0.01


def shots_value(value: Any) -> int | str:
    """`shots`: a positive integer or 'all'."""
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ConfigError(f"shots={value!r}: a positive integer or 'all'")


def section(params: dict[str, Any], dotted: str) -> Any:
    """params['a']['b'] for 'a.b', with a ConfigError naming the missing key."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params.yaml: missing key {dotted}")
        node = node[part]
    return node
