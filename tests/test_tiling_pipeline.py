"""Tiling through the pipeline's pieces on a small generated high-resolution tree: the features stage (tiles with
positions), score@knn (tiled banks, stitched maps), the tiled kNN bundle and `predict` (1e-4 of the pipeline's test
scores), the ONNX refusal, and validate's acceptance / refusals (one line naming the method and key)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import predict_copy

from anomaly_core.kit.knn import KnnConfig
from anomaly_core.kit.tiling import TilingConfig, tile_grid

BACKBONE = {"name": "efficientnet_lite0", "pretrained": "random", "levels": [2, 3], "image_size": 64}
SIDE = 160   # generated images (px): tiles of 64 at stride 48 -> 3 x 3 = 9 per image at native resolution
SIZE = 128   # data.image_size: the stitched maps' side
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

CASES = {  # (tiling, knn): one bank per tile position and max; one bank of every tile, re-weighting, resized first
    "position_aware": ({"enabled": True, "tile": 64, "stride": 48, "resolution": "native", "position_aware": True},
                       {"image_score": "max"}),
    "one_bank_128px": ({"enabled": True, "tile": 64, "stride": 48, "resolution": 128, "position_aware": False},
                       {"image_score": "reweight"}),
}


def tiled_run(root: Path, tiling: dict, knn: dict):
    """generate_demo (160 px, defects 3-6 px) -> prepare's rows -> the features stage (CLI) -> score@knn (the
    registry's score on the stage's cache) -> the kNN bundle. Returns (rows, scores, features dir, bundle, cfg)."""
    from typer.testing import CliRunner

    from anomaly_core.data import manifest as mf
    from anomaly_core.data.demo import generate_demo
    from anomaly_core.data.readers import read_mvtec
    from anomaly_core.deploy.bundle import BundleInputs
    from anomaly_core.deploy.engines import deploy_module
    from anomaly_core.io import write_json
    from anomaly_core.methods import get_method
    from anomaly_core.methods.base import context_for
    from anomaly_core.store import SOURCE, FeatureStore
    from stages.features import app

    generate_demo(root / "demo", 0, categories=["brick"], n_train=3, n_test_good=3, n_test_defect_per_type=1,
                  size=SIDE, defect_px=(3, 6))
    rows = mf.select_shots(mf.carve_val(read_mvtec(root / "demo", "all"), 0.4, 0), "all", 0)
    mf.write_manifest([dataclasses.replace(r, split=SOURCE[r.split]) for r in rows], root / "images.csv")
    write_json(root / "features.json", {"task": "anomaly", "features": {"batch_size": 4, "dtype": "float16"},
                                        "backbones": {"visual": BACKBONE}, "tiling": tiling})
    res = CliRunner().invoke(app, ["--images", str(root / "images.csv"), "--config", str(root / "features.json"),
                                   "--out", str(root / "features")])
    assert res.exit_code == 0, res.output
    cfg = dataclasses.replace(KnnConfig(sigma=1.0), **knn)
    params = {"seed": 0, "data": {"image_size": SIZE}, "knn": asdict(cfg), "tiling": tiling}
    store = FeatureStore(root / "features")
    scores = get_method("knn").score(context_for(get_method("knn"), params, rows, store, root / "models"), {})
    thresholds = {c: {"image": float(img.median()), "pixel": None} for c, (_, img, _) in scores["val"].items()}
    export = {"data": {"image_size": SIZE}, "seed": 0, "features": {"dtype": "float16", "batch_size": 4},
              "backbones": {"visual": BACKBONE}, "score": {"knn": params}}
    inputs = BundleInputs(rows=rows, features=store.root, models=root / "models" / "knn", params=export, method="knn")
    deploy_module("knn").write_bundle(inputs, root / "bundle", {"method": "knn", "thresholds": thresholds})
    return rows, scores, root / "features", root / "bundle", cfg


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tmp_path_factory):
    tiling, knn = CASES[request.param]
    return (tiling, *tiled_run(tmp_path_factory.mktemp(request.param), tiling, knn))


def test_features_stage_stores_tiles_with_positions(run):
    from anomaly_core.io import load_tensors, read_json

    tiling, rows, _, features, _, _ = run
    side = SIDE if tiling["resolution"] == "native" else tiling["resolution"]
    tensors, meta = load_tensors(features / "visual" / "brick" / "train.safetensors")
    offsets = tile_grid(side, side, 64, 48).tolist()
    assert meta["tiles"] == offsets and meta["tiled_hw"] == [side, side] and len(offsets) == 9
    n_train = sum(r.split == "train" for r in rows)
    # efficientnet_lite0 levels 2, 3 on 64 px tiles: strides 8 and 16
    assert tensors["level_0"].shape[:2] == (n_train, 9) and tensors["level_0"].shape[-2:] == (8, 8)
    assert tensors["level_1"].shape[-2:] == (4, 4) and tensors["level_0"].dtype == torch.float16
    assert read_json(features / "info.json")["visual"]["tiling"] == {"tile": 64, "stride": 48,
                                                                     "resolution": tiling["resolution"]}


def test_score_stage_equals_the_tiled_knn_from_the_image_files(run):
    """The stage's path (cached float16 tiles -> banks -> stitched maps) is the library's end-to-end tiled kNN
    (`tiled_knn_scores`, features straight from the files in float16): same numbers."""
    from anomaly_core.backbones import create_backbone
    from anomaly_core.data.holdout import shot_rows
    from anomaly_core.kit.tiled_knn import tiled_knn_scores

    tiling, rows, scores, _, _, cfg = run
    ids, image, maps = scores["test"]["brick"]
    assert maps.shape == (len(ids), SIZE, SIZE) and maps.dtype == torch.float16
    by_id = {r.id: r for r in rows}
    bb = create_backbone(BACKBONE["name"], "random", BACKBONE["levels"], BACKBONE["image_size"])
    ref_image, ref_maps = tiled_knn_scores(bb, [r.image for r in shot_rows(rows, "brick")],
                                           [by_id[i].image for i in ids], cfg, TilingConfig(**tiling), SIZE,
                                           dtype=torch.float16)
    np.testing.assert_allclose(image.numpy(), ref_image.numpy(), rtol=0, atol=1e-4)  # float32 search order
    np.testing.assert_allclose(maps.float().numpy(), ref_maps.numpy(), rtol=0, atol=2e-3)  # float16 maps
    assert float(maps.float().std()) > 0 and len(set(image.tolist())) == len(ids)


def test_predict_on_the_tiled_bundle_reproduces_the_pipeline_test_scores(run, tmp_path, monkeypatch):
    from anomaly_core.deploy.bundle import read_card

    tiling, rows, scores, _, bundle, _ = run
    card = read_card(bundle)
    assert {k: card["tiling"][k] for k in ("tile", "stride", "resolution", "position_aware")} == \
        {k: tiling[k] for k in ("tile", "stride", "resolution", "position_aware")}
    assert len(card["tiles"]["brick"]["offsets"]) == 9
    assert len(card["banks"]["brick"]) == (9 if tiling["position_aware"] else 1)
    got, image = predict_copy(bundle, rows, scores, tmp_path, monkeypatch)
    np.testing.assert_allclose([g["score"] for g in got], image.numpy(), rtol=0, atol=1e-4)
    assert len(list((tmp_path / "out" / "heatmaps").glob("*.png"))) == len(image)


def test_onnx_export_of_a_tiled_bundle_is_a_one_line_refusal(run):
    from anomaly_core.deploy.engines import deploy_module, load_predictor
    from anomaly_core.errors import DataError

    bundle = run[4]
    with pytest.raises(DataError, match=r"a tiled kNN bundle .*ONNX export takes untiled kNN bundles only") as err:
        deploy_module("knn").onnx_graph(load_predictor(bundle), "brick")
    assert "\n" not in str(err.value)


def test_predict_refuses_an_image_of_another_size_in_one_line(run, tmp_path):
    from PIL import Image

    from anomaly_core.deploy.predict import predict_files

    tiling, bundle = run[0], run[4]
    if tiling["resolution"] != "native":
        pytest.skip("a fixed tiling resolution resizes every image")
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(Exception, match=r"big.png: 200x200 px at tiling resolution native.*160x160"):
        predict_files(bundle, [tmp_path / "big.png"], tmp_path / "out", category="brick", progress=False)


# ---------------------------------------------------------------------------- validate / stage configs


def _params():
    return yaml.safe_load(PARAMS.read_text())


def _errors(params):
    from anomaly_core.methods import method_names
    from anomaly_core.validation import default_schema, validate_params

    return validate_params(params, default_schema(method_names()))


def test_default_stage_configs_carry_no_tiling_key():
    """The 224 px default path: features.json and score-knn.json are as before tiling existed (no `tiling` key),
    so DVC's hashes of them, and the stages they drive, do not change."""
    from anomaly_core.pipeline import stage_configs

    configs = stage_configs(_params())
    assert all("tiling" not in c for c in configs.values())
    assert "tiling" not in configs["export"]["score"]["knn"]


def test_validate_accepts_tiling_for_knn_and_names_what_does_not_tile():
    from anomaly_core.pipeline import stage_configs

    on = _params()
    on["tiling"]["enabled"] = True
    assert _errors(on) == []  # the default selection: kNN, VPT-kNN and MuSc (visual branch) all tile
    on["methods"] = ["zero_shot_clip", "knn", "musc"]
    on["musc"]["branch"] = "clip"  # MuSc on CLIP tokens does not read the tiled branch
    assert _errors(on) == []
    configs = stage_configs(on)
    assert configs["features"]["tiling"] == on["tiling"] == configs["score-knn"]["tiling"]
    assert configs["export"]["score"]["knn"]["tiling"] == on["tiling"]
    assert "tiling" not in configs["score-musc"] and "tiling" not in configs["score-zero_shot_clip"]

    bad = copy.deepcopy(on)
    bad["tiling"].update(position_aware=True)  # knn.image_score: reweight in params.yaml
    bad["tiling"]["tile"], bad["dist"]["nproc"] = 192, 2
    assert _errors(bad) == [
        "tiling.position_aware=true with knn.image_score=reweight: the re-weighting needs one bank (set "
        "knn.image_score to max or topk_mean) (method knn)",
        "tiling.tile=192: must equal backbones.visual.image_size=224 (the backbone sees each tile at its own "
        "resolution; set both to the same value)",
        "dist.nproc=2: tiled features are extracted by one process (set dist.nproc: 1 or tiling.enabled: false)"]
    clip = copy.deepcopy(on)
    clip["knn"]["branch"] = "clip"
    assert _errors(clip) == ["tiling.enabled=true needs knn.branch=visual (got clip): CLIP tokens are not tiled "
                             "(method knn)"]


def test_lazy_scores_read_each_category_on_lookup_with_the_same_values(tmp_path):
    """evaluate reads score files lazily (one category's maps in memory at a time): same values as the dict."""
    from anomaly_core.store import LazyScores, load_scores, save_scores

    g = torch.Generator().manual_seed(0)
    per_cat = {c: ([f"{c}/{i}" for i in range(n)], torch.rand(n, generator=g), torch.rand(n, 16, 16, generator=g))
               for c, n in (("a", 3), ("b", 2))}
    save_scores(tmp_path / "test.safetensors", per_cat)
    eager, lazy = load_scores(tmp_path / "test.safetensors"), load_scores(tmp_path / "test.safetensors", lazy=True)
    assert isinstance(lazy, LazyScores) and list(lazy) == list(eager) == ["a", "b"] and len(lazy) == 2
    assert not any(isinstance(v, torch.Tensor) for v in vars(lazy).values())  # holds no tensor between lookups
    for c in eager:
        assert lazy[c][0] == eager[c][0] == per_cat[c][0]
        assert torch.equal(lazy[c][1], eager[c][1]) and torch.equal(lazy[c][2], eager[c][2])
        assert torch.equal(lazy[c][2], per_cat[c][2].half().float())
    with pytest.raises(KeyError):
        lazy["c"]


def test_evaluate_computes_pixel_metrics_of_the_stitched_maps_at_pixel_size(run, tmp_path):
    """evaluate (lazy score files, one category at a time) on the tiled kNN's stitched 128 px maps with
    evaluate.pixel_size = 160 (the native side): the metrics of the maps resized bilinearly against the masks at
    160 px (nearest), as computed directly."""
    from anomaly_core import evaluation as ev
    from anomaly_core.data import manifest as mf
    from anomaly_core.reporting import evaluate_methods
    from anomaly_core.store import save_scores

    _, rows, scores, _, _, _ = run
    for split in ("val", "test"):
        save_scores(tmp_path / "knn" / f"{split}.safetensors", scores[split])
    summary, per_cat = evaluate_methods(rows, {"knn": tmp_path / "knn"}, SIZE, 0.3, 1, tmp_path / "metrics",
                                        tmp_path / "reports", pixel_size=SIDE)
    part = mf.rows_for(rows, "brick", "test")
    image, maps = ev.align(part, *scores["test"]["brick"])
    maps = ev.at_size(maps.astype(np.float32), SIDE)
    assert maps.shape[-1] == SIDE
    want = ev.rounded({"brick": ev.category_metrics(np.array([r.label for r in part]), ev.masks_for(part, SIDE),
                                                    image, maps, 0.3, category="brick")})
    assert per_cat["knn"] == want and 0 < want["brick"]["pixel_auroc"] < 1
    assert (tmp_path / "reports" / "heatmaps" / "knn_brick.png").is_file()
