"""Thresholds chosen on val, the exported bundle and `predict` (kNN), against the pipeline's own numbers."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from anomaly_core.deploy.thresholds import ThresholdConfig, binary_metrics, category_thresholds, choose_threshold


def test_f1_threshold_maximises_val_f1_against_sklearn():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(15)].astype(int)
    s = np.r_[rng.normal(0, 1, 40), rng.normal(1.5, 1, 15)]
    t, notes = choose_threshold(y, s, "f1")
    assert notes == []
    best = max(f1_score(y, s >= c) for c in np.unique(s))  # brute force over every candidate threshold
    assert f1_score(y, s >= t) == pytest.approx(best)
    m = binary_metrics(y, s, t)
    assert m["precision"] == pytest.approx(precision_score(y, s >= t))
    assert m["recall"] == pytest.approx(recall_score(y, s >= t))
    assert m["f1"] == pytest.approx(best)


def test_fpr_threshold_is_the_smallest_with_fpr_at_most_target():
    s = np.arange(20, dtype=float)  # 20 normals, scores 0..19
    y = np.zeros(20, dtype=int)
    t, notes = choose_threshold(y, s, "fpr", fpr=0.1)
    assert t == 18.0  # 18 and 19 flagged: FPR 0.1; 17 would give 0.15
    assert notes and "no anomalies" in notes[0]  # fpr mode without val anomalies: a threshold and a warning
    assert binary_metrics(y, s, t)["fpr"] == pytest.approx(0.1)
    t0, _ = choose_threshold(y, s, "fpr", fpr=0.0)
    assert t0 > 19.0 and binary_metrics(y, s, t0)["fpr"] == 0.0


def test_f1_mode_without_val_anomalies_falls_back_to_fpr_with_a_warning():
    s = np.linspace(0, 1, 11)
    t, notes = choose_threshold(np.zeros(11), s, "f1", fpr=0.2)
    assert t == pytest.approx(0.9) and "F1 is undefined" in notes[0]  # 2 of 11 flagged (0.18); 3 would be 0.27


def test_fixed_and_pixel_thresholds_and_no_masks():
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[2:, 2:5, 2:5] = True
    maps = rng.normal(0, 0.1, (4, 8, 8)) + 2.0 * masks
    image = maps.reshape(4, -1).max(1)
    cfg = ThresholdConfig(mode="f1")
    out = category_thresholds(labels, image, masks, maps, cfg, "c", has_masks=True)
    assert binary_metrics(masks, maps, out["pixel"])["f1"] == 1.0  # separable pixels: a perfect F1 threshold
    none = category_thresholds(labels, image, masks, maps, cfg, "c", has_masks=False)
    assert none["pixel"] is None and "no ground-truth masks" in none["pixel_note"]
    fixed = category_thresholds(labels, image, masks, maps, ThresholdConfig(mode="fixed", value=0.7), "c", True)
    assert fixed["image"] == fixed["pixel"] == 0.7


# ---------------------------------------------------------------------------- bundle + predict (kNN)

import shutil
from pathlib import Path

import torch
from conftest import make_mvtec_tree

BACKBONE = {"name": "efficientnet_lite0", "pretrained": "random", "levels": [2, 3], "image_size": 64}
SIZE = 32  # data.image_size (map resolution)


def tiny_knn_run(root: Path):
    """A tiny pipeline run through the library calls of the stages: prepare (read, carve val, shots), features
    (`extract_features` cached in float16 like stages/features.py), score (`kit.knn.knn_scores`, as method knn)."""
    from anomaly_core.backbones import create_backbone
    from anomaly_core.data import manifest as mf
    from anomaly_core.data.readers import read_mvtec
    from anomaly_core.features import extract_features
    from anomaly_core.io import save_tensors, write_json
    from anomaly_core.kit.knn import KnnConfig, knn_scores
    from anomaly_core.store import FeatureStore

    data = make_mvtec_tree(root / "mvtec")
    rows = mf.select_shots(mf.carve_val(read_mvtec(data, "all"), 0.4, 0), "all", 0)
    bb = create_backbone(BACKBONE["name"], "random", BACKBONE["levels"], BACKBONE["image_size"])
    feats = root / "features"
    for cat in mf.categories(rows):
        for split in ("train", "test"):
            source = {"train": "train", "val": "test", "test": "test"}  # val is carved from test (store.SOURCE)
            part = [r for r in rows if r.category == cat and source[r.split] == split]
            out = extract_features(bb, [r.image for r in part], 4, torch.float16, progress=False)
            save_tensors(feats / "visual" / cat / f"{split}.safetensors", out, {"ids": [r.id for r in part]})
    write_json(feats / "info.json", {"visual": {"name": bb.name, "untrained": True}})
    store = FeatureStore(feats)
    cfg = KnnConfig(sigma=1.0)
    return rows, store, cfg, knn_scores(store, rows, cfg, SIZE, 0)


def write_tiny_knn_bundle(root: Path):
    """tiny_knn_run under `root`, then its kNN bundle in `root/bundle` (image thresholds: the val medians)
    -> (rows, scores)."""
    from dataclasses import asdict

    from anomaly_core.deploy.bundle import BundleInputs
    from anomaly_core.deploy.engines import deploy_module

    rows, store, cfg, scores = tiny_knn_run(root)
    thresholds = {c: {"image": float(img.median()), "pixel": None} for c, (_, img, _) in scores["val"].items()}
    params = {"data": {"image_size": SIZE}, "seed": 0, "features": {"dtype": "float16"},
              "backbones": {"visual": BACKBONE}, "score": {"knn": {"knn": asdict(cfg)}}}
    inputs = BundleInputs(rows=rows, features=store.root, models=root / "models" / "knn", params=params, method="knn")
    deploy_module("knn").write_bundle(inputs, root / "bundle", {"method": "knn", "thresholds": thresholds})
    return rows, scores


@pytest.fixture(scope="module")
def knn_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    rows, scores = write_tiny_knn_bundle(root)
    return root, rows, scores


def test_predict_reproduces_pipeline_test_scores_from_a_copied_bundle(knn_bundle, tmp_path, monkeypatch):
    import csv

    from anomaly_core.deploy.predict import predict_files

    root, rows, scores = knn_bundle
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "bundle", elsewhere / "bundle")  # only the bundle: no features, no DVC repo
    monkeypatch.chdir(elsewhere)
    by_id = {r.id: r for r in rows}
    for cat, (ids, image, _) in scores["test"].items():
        paths = [by_id[i].image for i in ids]
        got = predict_files("bundle", paths, "out", category=cat, heatmaps=True, batch_size=3, progress=False)
        assert [g["error"] for g in got] == [""] * len(ids)
        np.testing.assert_allclose([g["score"] for g in got], image.numpy(), rtol=0, atol=1e-4)
        with open(Path("out") / "predictions.csv") as fh:
            table = list(csv.DictReader(fh))
        assert [float(t["score"]) for t in table] == pytest.approx([g["score"] for g in got])
        t = float(table[0]["threshold"])
        assert [int(r["is_anomalous"]) for r in table] == [int(g["score"] >= t) for g in got]
        assert len(list((Path("out") / "heatmaps").glob("*.png"))) >= len(ids)


def test_predict_reports_a_corrupt_file_and_scores_the_others(knn_bundle, tmp_path):
    from anomaly_core.deploy.predict import predict_files

    root, rows, scores = knn_bundle
    cat, (ids, image, _) = next(iter(scores["test"].items()))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = next(r.image for r in rows if r.id == ids[0])
    got = predict_files(root / "bundle", [bad, good], tmp_path / "out", category=cat, progress=False)
    assert got[0]["score"] == "" and "broken.png" in got[0]["error"]
    assert got[1]["error"] == "" and got[1]["score"] == pytest.approx(float(image[0]), abs=1e-4)
    with pytest.raises(Exception, match="--category"):
        predict_files(root / "bundle", [good], tmp_path / "o2", category=None, progress=False)


def test_onnx_engine_agrees_with_the_pipeline(knn_bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from anomaly_core.deploy.onnx import export_bundle
    from anomaly_core.deploy.predict import predict_files

    root, rows, scores = knn_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "bundle", bundle)
    lines = export_bundle(bundle, check=False)
    assert len(lines) == len(scores["test"])
    by_id = {r.id: r for r in rows}
    for cat, (ids, image, _) in scores["test"].items():
        got = predict_files(bundle, [by_id[i].image for i in ids], tmp_path / "out", category=cat, batch_size=4,
                            engine="onnx", progress=False)
        np.testing.assert_allclose([g["score"] for g in got], image.numpy(), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------- every method, fusion, MuSc

import os
from contextlib import contextmanager

import yaml
from conftest import with_changes

REPO = Path(__file__).resolve().parents[1]
# one tiny demo category through the real stage code (in process, no DVC), every method (1-3 training epochs)
PIPE_METHODS = ["aaclip", "prompt_clip", "multi_prototype", "zero_shot_clip", "image_prototype", "knn", "vpt_knn", "musc"]
PIPE_CHANGES = {"methods": PIPE_METHODS, "data.categories": ["brick"], "data.image_size": 64,
                "data.demo.n_train": 6, "data.demo.n_test_good": 4, "data.demo.n_test_defect_per_type": 2,
                "data.demo.size": 96, "aaclip_text.epochs": 1, "aaclip_image.epochs": 1, "vpt_knn.epochs": 2,
                "prompt_clip.epochs": 2, "multi_prototype.epochs": 3,
                "features.batch_size": 8, "evaluate.n_heatmaps": 0, "fusion.clip_method": "zero_shot_clip",
                "fusion.visual_method": "knn"}


@contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_stages(root: Path) -> None:
    """validate .. fuse of `PIPE_CHANGES` in `root`, calling each stage's `main` as `dvc repro` runs it."""
    import stages.demo_data  # noqa: E401
    import stages.features
    import stages.fit
    import stages.fuse
    import stages.prepare
    import stages.score
    import stages.train_image_adapter  # noqa: E401
    import stages.train_text_adapter
    import stages.validate

    params = with_changes(yaml.safe_load((REPO / "params.yaml").read_text()), PIPE_CHANGES)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    P, cfg = Path, lambda name: Path(f"data/config/{name}.json")
    man, feats = P("data/prepared/manifest.csv"), P("data/features")
    stages.validate.main(params_file=P("params.yaml"), out=P("data/config"))
    stages.demo_data.main(out=P("data/demo"), config=cfg("demo_data"))
    stages.prepare.main(demo_root=P("data/demo"), config=cfg("prepare"), out=P("data/prepared"))
    stages.features.main(images=P("data/prepared/images.csv"), config=cfg("features"), out=feats)
    stages.train_text_adapter.main(manifest=man, features=feats, config=cfg("train_text_adapter"),
                                   out=P("data/models/aaclip/text.pt"), history=P("metrics/train/aaclip_text"))
    stages.train_image_adapter.main(manifest=man, text_adapters=P("data/models/aaclip/text.pt"),
                                    config=cfg("train_image_adapter"), out=P("data/models/aaclip/image.pt"),
                                    history=P("metrics/train/aaclip_image"))
    for m in PIPE_METHODS:
        stages.fit.main(method=m, config=cfg(f"fit-{m}"), manifest=man, features=feats, models=P(f"data/models/{m}"),
                        report=P(f"metrics/fit/{m}.json"), curves=P(f"metrics/train/{m}"))
        stages.score.main(method=m, config=cfg(f"score-{m}"), manifest=man, features=feats,
                          models=P(f"data/models/{m}"), out=P(f"data/scores/{m}"))
    stages.fuse.main(manifest=man, config=cfg("fuse"), scores=P("data/scores"), out=P("data/fused"),
                     metrics=P("metrics"))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """(repo root, manifest rows) of one tiny pipeline run with every kind of bundle's methods."""
    from anomaly_core.data import manifest as mf

    root = tmp_path_factory.mktemp("pipe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALY_CORE_PROGRESS", "0")
        mp.setenv("ANOMALY_CORE_DEVICE", "cpu")
        with _cwd(root):
            run_stages(root)
    return root, mf.read_manifest(root / "data/prepared/manifest.csv")


def export_as(root: Path, rows, method: str, out: Path) -> dict:
    """The export stage's work with `export.method = method` (evaluate's metrics files are not needed)."""
    from anomaly_core.deploy.export import export_experiment
    from anomaly_core.io import read_json

    params = read_json(root / "data/config/export.json")
    params["export"]["method"] = method
    with _cwd(root):
        return export_experiment(params, rows, Path("data/scores"), Path("data/fused"), Path("data/features"), {}, {},
                                 out, out.parent / "metrics", Path("data/models"))


@pytest.mark.parametrize("method", ["fusion", "zero_shot_clip", "aaclip", "image_prototype", "vpt_knn", "prompt_clip",
                                    "multi_prototype"])
def test_every_bundle_kind_reproduces_the_pipeline_test_scores(pipeline_run, method, tmp_path):
    from anomaly_core.deploy.predict import predict_files
    from anomaly_core.store import load_scores

    root, rows = pipeline_run
    card = export_as(root, rows, method, tmp_path / "export" / "bundle")
    assert card["exported"] and card["method"] == method
    assert card["kind"] == ("fusion" if method == "fusion" else "method")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "export" / "bundle", elsewhere / "bundle")  # only the bundle: no data/, no DVC
    expected = load_scores(root / ("data/fused/fusion" if method == "fusion" else f"data/scores/{method}")
                           / "test.safetensors")
    by_id = {r.id: r for r in rows}
    with _cwd(elsewhere):
        for cat, (ids, image, _) in expected.items():
            got = predict_files("bundle", [root / by_id[i].image for i in ids], "out", category=cat, batch_size=5,
                                progress=False)
            assert [g["error"] for g in got] == [""] * len(ids)
            np.testing.assert_allclose([g["score"] for g in got], image.numpy(), rtol=0, atol=1e-4)
    if method == "fusion":  # the pipeline's own alpha and val statistics, and both branches' bundles
        from anomaly_core.io import read_json

        assert card["fusion"] == read_json(root / "data/fused/fusion/model.json")
        assert card["members"]["clip"]["method"] == "zero_shot_clip" and card["members"]["visual"]["kind"] == "knn"


def test_musc_bundle_scores_the_given_images_as_one_pool(pipeline_run, tmp_path):
    """MuSc is transductive: `predict` scores all images it is given (per category) against each other. Given the
    pipeline's pool (the category's val and test images), it reproduces the pipeline's test scores."""
    from anomaly_core.data.manifest import rows_for
    from anomaly_core.deploy.predict import predict_files
    from anomaly_core.errors import DataError
    from anomaly_core.store import load_scores

    root, rows = pipeline_run
    card = export_as(root, rows, "musc", tmp_path / "bundle")
    assert card["transductive"] is True and card["kind"] == "method"
    for cat, (ids, image, _) in load_scores(root / "data/scores/musc/test.safetensors").items():
        pool = rows_for(rows, cat, "val") + rows_for(rows, cat, "test")
        got = predict_files(tmp_path / "bundle", [root / r.image for r in pool], tmp_path / "out", category=cat,
                            batch_size=2, progress=False)  # batch_size is overridden: one pool
        by_path = {g["path"]: g["score"] for g in got}
        want = {r.id: str(root / r.image) for r in pool}
        np.testing.assert_allclose([by_path[want[i]] for i in ids], image.numpy(), rtol=0, atol=1e-4)
        with pytest.raises(DataError, match="transductive"):
            predict_files(tmp_path / "bundle", [root / pool[0].image], tmp_path / "o1", category=cat, progress=False)


def test_export_onnx_refuses_a_non_knn_bundle_with_a_clear_error(pipeline_run, tmp_path):
    from anomaly_core.deploy.onnx import export_bundle
    from anomaly_core.errors import DataError

    root, rows = pipeline_run
    export_as(root, rows, "zero_shot_clip", tmp_path / "bundle")
    with pytest.raises(DataError, match="kNN bundles only"):
        export_bundle(tmp_path / "bundle", check=False)
