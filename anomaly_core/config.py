"""Typed configs built from plain dicts (the stage scripts read params.yaml; the library never does).

`build(cls, mapping, section)` fills a dataclass, refusing unknown keys and values of the wrong type
with a `ConfigError` that names the params.yaml key. With `strict=True` a key missing from `mapping` is an
error too (params.yaml is the one place defaults live; the dataclass defaults only serve tests and library
callers); `inject={field: value}` supplies fields that do not come from the section (the top-level `seed`).
Every error of a section is collected: a `ConfigErrors` carries them all (`.errors`, one line each).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from anomaly_core.errors import ConfigError

T = TypeVar("T")
MISSING_HINT = "every key must be set in params.yaml, where the defaults live"


class ConfigErrors(ConfigError):
    """Several config errors at once; `errors` holds one line per problem, str() joins them with newlines."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def error_lines(exc: ConfigError) -> list[str]:
    """The one-line messages a ConfigError (or ConfigErrors) carries."""
    return list(getattr(exc, "errors", None) or [str(exc)])


class Checks:
    """Collects range problems of one section; `done()` raises them all as one `ConfigErrors`.

    Each message reads `<section>.<key>=<value>: <what is allowed>`.
    """

    def __init__(self, section: str):
        self.section, self.errors = section, []

    def add(self, key: str, value: Any, allowed: str) -> None:
        self.errors.append(f"{self.section}.{key}={value!r}: {allowed}")

    def that(self, ok: bool, key: str, value: Any, allowed: str) -> "Checks":
        if not ok:
            self.add(key, value, allowed)
        return self

    def positive(self, **values: float) -> "Checks":
        for k, v in values.items():
            self.that(v > 0, k, v, "must be > 0")
        return self

    def non_negative(self, **values: float) -> "Checks":
        for k, v in values.items():
            self.that(v >= 0, k, v, "must be >= 0")
        return self

    def unit(self, **values: float) -> "Checks":
        """Values in [0, 1] (weights, alphas)."""
        for k, v in values.items():
            self.that(0.0 <= v <= 1.0, k, v, "must be in [0, 1]")
        return self

    def fraction(self, **values: float) -> "Checks":
        """Held-out shares in (0, 1): 0 would hold nothing out (every choice made on training rows)."""
        for k, v in values.items():
            self.that(0.0 < v < 1.0, k, v, "must be in (0, 1)")
        return self

    def open_unit(self, **values: float) -> "Checks":
        """Values in (0, 1] (max_fpr, coreset ratios)."""
        for k, v in values.items():
            self.that(0.0 < v <= 1.0, k, v, "must be in (0, 1]")
        return self

    def alphas(self, key: str, values: list[float]) -> "Checks":
        return self.that(bool(values) and all(0.0 <= a <= 1.0 for a in values), key, values,
                         "a non-empty list of values in [0, 1]")

    def done(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)


def _check(value: Any, tp: Any, key: str, strict: bool = False) -> Any:
    """Validate (and lightly coerce int->float) `value` against the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r}: must be one of {list(get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):
            try:
                return _check(value, arm, key, strict)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        (arm,) = get_args(tp)[:1] or (Any,)
        return [_check(v, arm, f"{key}[{i}]", strict) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, strict=strict)
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


def _type_name(tp: Any) -> str:
    """'int | str' style names for error messages."""
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return f"a list of {_type_name((get_args(tp) or (Any,))[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def build_errors(cls: type[T], mapping: Any, section: str, strict: bool = False,
                 inject: dict[str, Any] | None = None) -> tuple[T | None, list[str]]:
    """(config, []) or (None, every problem of the section as one line each); never raises ConfigError.

    Unknown keys, missing keys (strict), wrong types and, when those pass, the config's `validate` ranges.
    `inject` fields must not appear in `mapping` (they come from elsewhere, e.g. the top-level `seed`).
    """
    if mapping is None:
        if strict:
            return None, [f"{section}: missing or empty section ({MISSING_HINT})"]
        mapping = {}
    if not isinstance(mapping, dict):
        return None, [f"{section}: expected a mapping, got {mapping!r}"]
    inject = inject or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    errors = [f"{section}.{k}: unknown key (known: {', '.join(sorted(names - set(inject)))})"
              for k in sorted(set(mapping) - names, key=str)]
    errors += [f"{section}.{k}: set from the top-level `{k}` param, remove it from the section"
               for k in sorted(set(mapping) & set(inject))]
    missing = []
    if strict:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in inject and f.name not in mapping]
        errors += [f"{section}.{k}: missing key ({MISSING_HINT})" for k in missing]
    values = {}
    for k, v in {**mapping, **inject}.items():
        if k not in names:
            continue
        try:
            values[k] = _check(v, hints[k], f"{section}.{k}", strict)
        except ConfigError as exc:
            errors += error_lines(exc)
    if len(errors) > len(missing):  # wrong keys or types: ranges cannot be checked
        return None, errors
    try:  # only missing keys: still check the ranges of the values that are there (built-in defaults fill in)
        obj = cls(**values)
    except TypeError as exc:
        return None, errors or [f"{section}: {exc}"]
    validate = getattr(obj, "validate", None)
    if validate:
        try:
            validate(section)
        except ConfigError as exc:
            errors += [e for e in error_lines(exc) if not any(e.startswith(f"{section}.{k}=") for k in missing)]
    return (None, errors) if errors else (obj, [])


def build(cls: type[T], mapping: dict[str, Any] | None, section: str, *, strict: bool = False,
          inject: dict[str, Any] | None = None) -> T:
    """Fill dataclass `cls` from `mapping` (the params.yaml section named `section`).

    strict: every field must be in `mapping` (or `inject`); a missing key is an error naming it.
    inject: values of fields that do not come from the section (e.g. {"seed": params["seed"]}).
    Raises ConfigError (a ConfigErrors listing every problem when there are several).
    """
    obj, errors = build_errors(cls, mapping, section, strict, inject)
    if errors:
        raise ConfigErrors(errors) if len(errors) > 1 else ConfigError(errors[0])
    return obj


def positive(section: str, **values: float) -> None:
    Checks(section).positive(**values).done()


@dataclass
class DemoConfig:
    n_train: int = 24
    n_test_good: int = 16
    n_test_defect_per_type: int = 6
    size: int = 256

    def validate(self, section: str) -> None:
        Checks(section).positive(n_train=self.n_train, n_test_good=self.n_test_good,
                                 n_test_defect_per_type=self.n_test_defect_per_type, size=self.size).done()


@dataclass
class FolderConfig:
    """`data.folder` (format folder, as anomalib's Folder datamodule): directories under `data.root`."""
    normal_dir: str = "good"
    abnormal_dir: str = "defect"
    mask_dir: str = ""            # "" = no masks: pixel metrics are not available
    normal_test_dir: str = ""     # "" = test a seeded share `normal_split_ratio` of normal_dir
    normal_split_ratio: float = 0.2

    def validate(self, section: str) -> None:
        Checks(section).that(bool(self.normal_dir), "normal_dir", self.normal_dir, "a directory under data.root") \
            .that(bool(self.abnormal_dir), "abnormal_dir", self.abnormal_dir, "a directory under data.root") \
            .that(0.0 < self.normal_split_ratio < 1.0, "normal_split_ratio", self.normal_split_ratio,
                  "must be in (0, 1)") \
            .that(not self.normal_test_dir or self.normal_test_dir not in (self.normal_dir, self.abnormal_dir),
                  "normal_test_dir", self.normal_test_dir, "'' or a directory other than normal_dir and abnormal_dir "
                  "(training images would be tested)") \
            .that(not self.mask_dir or self.mask_dir not in (self.abnormal_dir, self.normal_dir, self.normal_test_dir),
                  "mask_dir", self.mask_dir, "'' or a directory other than abnormal_dir, normal_dir and "
                  "normal_test_dir (each image would be its own mask)").done()


@dataclass
class DataConfig:
    format: Literal["demo", "mvtec", "visa", "imagefolder", "folder"] = "demo"
    root: str = "data/raw"
    categories: Union[str, list[str]] = "all"
    val_fraction: float = 0.4
    image_size: int = 224
    demo: DemoConfig = field(default_factory=DemoConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    on_one_class: Literal["error", "skip"] = "error"  # a category whose test/val split lacks a class
    max_pixels: int = 40_000_000  # an image above this many pixels (header WxH) is refused by prepare

    def validate(self, section: str) -> None:
        c = Checks(section)
        if isinstance(self.categories, str):
            c.that(self.categories == "all", "categories", self.categories, "a list of names or 'all'")
        else:
            c.that(bool(self.categories), "categories", self.categories, "a non-empty list of names or 'all'")
        c.that(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "must be in (0, 1)")
        c.positive(image_size=self.image_size, max_pixels=self.max_pixels).done()


@dataclass
class BackboneConfig:
    name: str
    pretrained: str = "random"
    levels: list[int] = field(default_factory=list)
    image_size: int = 224
    # a local weights file that leaves backbone tensors unloaded is refused unless this is true (then the missing
    # tensors stay random, are listed in a warning and in data/features/info.json)
    allow_partial_weights: bool = False

    def validate(self, section: str) -> None:
        c = Checks(section).that(bool(self.name.strip()), "name", self.name, "a model name")
        c.that(bool(self.levels) and all(v >= 0 for v in self.levels), "levels", self.levels,
               "a non-empty list of layer indices >= 0")
        c.positive(image_size=self.image_size).done()


@dataclass
class FeaturesConfig:
    batch_size: int = 16
    dtype: Literal["float16", "float32"] = "float16"

    def validate(self, section: str) -> None:
        Checks(section).positive(batch_size=self.batch_size).done()


@dataclass
class EvaluateConfig:
    max_fpr: float = 0.3      # AUPRO integration limit
    n_heatmaps: int = 4       # test images per category and method in reports/heatmaps
    pixel_size: int = 0       # side (px) of the pixel metrics: maps resized (bilinear), masks (nearest); 0 = the maps' own
    review: bool = True       # write the review page reports/review/ (thumbnails, heatmaps, verdicts.json)

    def validate(self, section: str) -> None:
        Checks(section).open_unit(max_fpr=self.max_fpr).non_negative(n_heatmaps=self.n_heatmaps,
                                                                     pixel_size=self.pixel_size).done()


@dataclass
class DistConfig:
    nproc: int = 1   # processes for features / train_image_adapter (torchrun when > 1)

    def validate(self, section: str) -> None:
        Checks(section).positive(nproc=self.nproc).done()


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
            raise ConfigError(f"params.yaml: missing key {dotted} ({MISSING_HINT})")
        node = node[part]
    return node
