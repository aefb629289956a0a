"""Strict typed configs and the whole-params validation (issue 11): every problem named, all at once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import with_changes

from anomaly_core.config import Checks, ConfigError, ConfigErrors, build, build_errors
from anomaly_core.kit.knn import KnnConfig
from anomaly_core.validation import Schema, Section, default_schema, resolve_params, rule_same_value, validate_params

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def params(**changes) -> dict:
    """A deep copy of the repository's params.yaml with dotted-key changes (value None deletes the key)."""
    return with_changes(PARAMS, changes, sep="__")


def test_repository_params_are_valid_and_complete():
    assert validate_params(PARAMS) == []
    configs = resolve_params(PARAMS)
    assert configs["knn"].sigma == PARAMS["knn"]["sigma"]
    assert configs["prompt_clip"].seed == PARAMS["seed"]  # injected from the top-level seed
    assert configs["data"].on_one_class == "error"


def test_deleted_key_is_an_error_naming_it():
    errors = validate_params(params(knn__sigma=None))
    assert errors == ["knn.sigma: missing key (every key must be set in params.yaml, where the defaults live)"]


def test_all_errors_at_once():
    errors = validate_params(params(seed="abc", knn__k=0, knn__sigma=None, evaluate__max_fpr=0,
                                    fusion__alphas=[0.5, 1.5], zero_shot_clip__image_weight=2.0, knnn={}))
    assert "seed='abc': an integer >= 0" in errors
    assert "knn.k=0: must be > 0" in errors  # ranges are checked even though knn.sigma is missing
    assert any(e.startswith("knn.sigma: missing key") for e in errors)
    assert "evaluate.max_fpr=0.0: must be in (0, 1]" in errors
    assert "fusion.alphas=[0.5, 1.5]: a non-empty list of values in [0, 1]" in errors
    assert "zero_shot_clip.image_weight=2.0: must be in [0, 1]" in errors
    assert any(e.startswith("knnn: unknown key") for e in errors)
    assert len(errors) == 7, errors  # seed='abc' reported once, not again in every seeded section


def test_old_section_name_is_one_line_naming_the_new_one():
    """`zero_shot` became `zero_shot_clip` (one name per method: folder, registry key, section, metrics)."""
    raw = params()
    raw["zero_shot"] = raw.pop("zero_shot_clip")
    assert validate_params(raw) == ["zero_shot: renamed to zero_shot_clip (rename the section in params.yaml)"]


@pytest.mark.parametrize("value", ["abc", -1, 1.5, True])
def test_seed_must_be_a_non_negative_int(value):
    assert validate_params(params(seed=value)) == [f"seed={value!r}: an integer >= 0"]


def test_scalars_and_methods():
    errors = validate_params(params(shots=0, task="segmentation", demo_seed=None))
    assert errors == ["shots=0: a positive integer or 'all'", "task='segmentation': one of ['anomaly', 'classification']",
                      "demo_seed: missing key (every key must be set in params.yaml, where the defaults live)"]
    known = ["knn", "zero_shot_clip", "aaclip"]
    without = params()
    del without["methods"]
    assert validate_params(without, default_schema(known))[0].startswith("methods: missing key")
    p = params(methods=["knn", "knn", "patchcore"], fusion__clip_method="prompt_clip")
    errors = validate_params(p, default_schema(known))
    assert "methods: unknown method 'patchcore' (known: knn, zero_shot_clip, aaclip)" in errors
    assert "methods=['knn', 'knn', 'patchcore']: listed twice: knn" in errors
    assert "fusion.clip_method='prompt_clip': 'auto' or one of ['knn', 'zero_shot_clip', 'aaclip']" in errors
    assert validate_params(params(methods=["knn", "aaclip"]), default_schema(known)) == []


def test_cross_key_image_sizes_must_agree():
    errors = validate_params(params(aaclip_image__image_size=336))
    assert errors == ["aaclip_image.image_size=336: must equal backbones.clip.image_size=224 (set both to the same value)"]


def test_demo_shots_cannot_exceed_the_generated_training_images():
    errors = validate_params(params(shots=PARAMS["data"]["demo"]["n_train"] + 1))
    assert len(errors) == 1 and errors[0].startswith(f"shots={PARAMS['data']['demo']['n_train'] + 1}: the demo has")


def test_injected_seed_must_not_be_in_the_section():
    errors = validate_params(params(vpt_knn__seed=3))
    assert errors == ["vpt_knn.seed: set from the top-level `seed` param, remove it from the section"]


def test_nested_sections_and_types():
    errors = validate_params(params(data__demo__size="big", data__on_one_class="ignore", backbones__cnn={}))
    assert "data.demo.size='big': expected int" in errors
    assert "data.on_one_class='ignore': must be one of ['error', 'skip']" in errors
    assert "backbones.cnn: unknown key (known: clip, visual)" in errors


def test_every_config_checks_its_ranges():
    """One out-of-range value per section: every section's validate names it."""
    bad = {"data__val_fraction": 1.0, "features__batch_size": 0, "zero_shot_clip__temperature": 0,
           "aaclip__holdout_fraction": 1.0, "aaclip_text__adapt_weight": 1.5, "aaclip_image__ksize": 4,
           "multi_prototype__holdout_fraction": -0.1, "image_prototype__temperature": 0,
           "prompt_clip__min_coverage": 0, "vpt_knn__prompt_scale": 0, "fusion__max_fpr": 1.5,
           "classification__stacker_folds": 1, "backbones__visual__levels": []}
    errors = validate_params(params(**bad))
    for dotted in bad:
        key = dotted.replace("__", ".")
        assert any(e.startswith(f"{key}=") for e in errors), (key, errors)
    assert len(errors) == len(bad), errors


def test_build_strict_and_inject():
    full = dict(PARAMS["knn"])
    assert build(KnnConfig, full, "knn", strict=True).k == full["k"]
    with pytest.raises(ConfigError, match=r"^knn\.sigma: missing key"):
        build(KnnConfig, {k: v for k, v in full.items() if k != "sigma"}, "knn", strict=True)
    assert build(KnnConfig, {"k": 2}, "knn").sigma == 4.0  # non-strict: library callers and tests
    with pytest.raises(ConfigErrors) as info:
        build(KnnConfig, {**full, "k": 0, "chunk": "many", "extra": 1}, "knn", strict=True)
    assert info.value.errors[0].startswith("knn.extra: unknown key")
    assert "knn.chunk='many': expected int" in info.value.errors


@dataclass
class _Toy:
    size: int = 1
    seed: int = 0

    def validate(self, section: str) -> None:
        Checks(section).positive(size=self.size).done()


def test_custom_schema_with_injected_field_and_rule():
    schema = Schema(sections={"a": Section(_Toy, ("seed",)), "b.c": Section(_Toy, ("seed",))},
                    rules=[rule_same_value("a.size", "b.c.size")], scalars=("seed",))
    assert validate_params({"seed": 1, "a": {"size": 2}, "b": {"c": {"size": 2}}}, schema) == []
    assert validate_params({"seed": 1, "a": {"size": 2}, "b": {"c": {"size": 3}}}, schema) == [
        "a.size=2: must equal b.c.size=3 (set both to the same value)"]
    obj, errors = build_errors(_Toy, {"size": 0}, "a", strict=True, inject={"seed": 5})
    assert obj is None and errors == ["a.size=0: must be > 0"]
    assert resolve_params({"seed": 7, "a": {"size": 2}, "b": {"c": {"size": 2}}}, schema)["b.c"] == _Toy(2, 7)
