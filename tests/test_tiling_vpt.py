"""VPT-kNN on tiles (methods/vpt_knn/tiled.py) on a small generated tree: prompts trained on the shots' tiles
(gradients reach them; the defect tiles are those holding mask pixels), the stitched map against a slow reference
(per-tile brute-force scoring of the modulated tiles, overlaps averaged by hand), one tile covering the whole image
equal to the untiled path, and predict on the exported (generic) bundle reproducing the pipeline's test scores."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import predict_copy

from anomaly_core.kit.knn import KnnConfig
from anomaly_core.kit.tiling import TilingConfig
from anomaly_core.methods.vpt_knn.vpt import VptConfig

SIDE = 160   # generated images (px): tiles of 64 at stride 48 -> 3 x 3 = 9 per image
SIZE = 128   # data.image_size: the stitched maps' side
VPT = {"num_prompts": 4, "num_defect_samples": 10, "epochs": 3, "lr": 1e-2, "batch_size": 8}
CASES = {  # (tiling, knn)
    "position_aware": ({"enabled": True, "tile": 64, "stride": 48, "resolution": "native", "position_aware": True},
                       {"image_score": "max"}),
    "one_bank": ({"enabled": True, "tile": 64, "stride": 48, "resolution": "native", "position_aware": False},
                 {"image_score": "reweight"}),
}


def backbone(side: int) -> dict:
    return {"name": "efficientnet_lite0", "pretrained": "random", "levels": [2, 3], "image_size": side}


def make_rows(root: Path, side: int):
    """generate_demo (brick, defects 3-6 px) -> rows with 3 shots, val anomalies of every defect type."""
    from anomaly_core.data import manifest as mf
    from anomaly_core.data.demo import generate_demo
    from anomaly_core.data.readers import read_mvtec
    from anomaly_core.store import SOURCE

    generate_demo(root / "demo", 0, categories=["brick"], n_train=3, n_test_good=4, n_test_defect_per_type=2,
                  size=side, defect_px=(3, 6))
    rows = mf.select_shots(mf.carve_val(read_mvtec(root / "demo", "all"), 0.4, 0), "all", 0)
    mf.write_manifest([dataclasses.replace(r, split=SOURCE[r.split]) for r in rows], root / "images.csv")
    return rows


def features(root: Path, name: str, side: int, tiling: dict | None, batch_size: int = 4) -> Path:
    """The features stage (CLI) on root/images.csv -> root/<name> (the backbone's input: the tile, or `side`)."""
    from typer.testing import CliRunner

    from anomaly_core.io import write_json
    from stages.features import app

    config = {"task": "anomaly", "features": {"batch_size": batch_size, "dtype": "float16"},  # tile = backbone input
              "backbones": {"visual": backbone(tiling["tile"] if tiling is not None else side)}}
    if tiling is not None:
        config["tiling"] = tiling
    write_json(root / f"{name}.json", config)
    res = CliRunner().invoke(app, ["--images", str(root / "images.csv"), "--config", str(root / f"{name}.json"),
                                   "--out", str(root / name)])
    assert res.exit_code == 0, res.output
    return root / name


def fit_and_score(rows, feats: Path, knn: dict, tiling: dict | None, size: int, models: Path):
    """The registry's vpt_knn fit (saved as the fit stage saves) and score on a feature cache -> (states, report,
    scores, params)."""
    from anomaly_core.methods import get_method
    from anomaly_core.methods.base import context_for, states_path
    from anomaly_core.store import FeatureStore

    m = get_method("vpt_knn")
    kcfg = dataclasses.replace(KnnConfig(sigma=1.0), **knn)
    params = {"seed": 0, "data": {"image_size": size}, "vpt_knn": VPT, "knn": asdict(kcfg)}
    if tiling is not None:
        params["tiling"] = tiling
    store = FeatureStore(feats)
    ctx = context_for(m, params, rows, store, models)
    states, report = m.fit(ctx)
    for cat, st in states.items():
        m.save(states_path(models, cat), st, ctx)
    return states, report, m.score(ctx, states), params


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tmp_path_factory):
    tiling, knn = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    rows = make_rows(root, SIDE)
    feats = features(root, "features", SIDE, tiling)
    states, report, scores, params = fit_and_score(rows, feats, knn, tiling, SIZE, root / "models")
    return dict(root=root, rows=rows, feats=feats, tiling=tiling, knn=knn, states=states, report=report,
                scores=scores, params=params)


# ---------------------------------------------------------------------------- training on tiles


def test_training_batches_are_tiles_and_gradients_reach_the_prompts(run):
    from PIL import Image

    from anomaly_core.data.holdout import shot_rows, val_anomalies
    from anomaly_core.kit.patches import cnn_patches
    from anomaly_core.methods.vpt_knn.tiled import tile_training_grids
    from anomaly_core.methods.vpt_knn.vpt import PromptModulator, image_embeddings, separability_loss
    from anomaly_core.store import FeatureStore

    store, tiling = FeatureStore(run["feats"]), TilingConfig(**run["tiling"])
    kcfg = KnnConfig(**run["params"]["knn"])
    normal_grid, defect_grid = tile_training_grids(store, kcfg, tiling)
    shots, anomalies = shot_rows(run["rows"], "brick"), val_anomalies(run["rows"], "brick")
    normal, defect = normal_grid(shots), defect_grid(anomalies)
    # every tile of every shot is a batch item: [S * T, h, w, D], image-major, as the cache holds them
    levels = [v.float().flatten(0, 1) for k, v in sorted(store.get("visual", shots).items()) if k.startswith("level_")]
    assert torch.equal(normal, cnn_patches(levels, kcfg.patch_aggregate, kcfg.patch_pad))
    assert normal.shape[:3] == (len(shots) * 9, 8, 8)  # 64 px tiles at the backbone's own input: 8 x 8 patches
    # the defect items: the tiles holding a mask pixel, counted here from the mask files
    offsets, _ = store.tiles("visual", anomalies)
    want = sum(bool((np.asarray(Image.open(r.mask)) > 0)[y:y + 64, x:x + 64].any())
               for r in anomalies for y, x in offsets.tolist())
    assert 0 < defect.shape[0] == want < len(anomalies) * 9

    model = PromptModulator(normal.reshape(-1, normal.shape[-1])[:VPT["num_prompts"]], 0.5)
    loss = separability_loss(image_embeddings(model, normal[:8]), image_embeddings(model, defect))
    loss.backward()
    grad = model.prompts.grad
    assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().max()) > 0

    report = run["report"]["brick"]
    assert len(report["loss"]) == VPT["epochs"] and report["split"]["defect_samples"] >= 1
    assert run["states"]["brick"].prompts.shape == (VPT["num_prompts"], normal.shape[-1])


# ---------------------------------------------------------------------------- scoring: slow reference


def modulate(model, x: torch.Tensor) -> torch.Tensor:
    """The prompt attention written out: x [M, D] -> x + scale * softmax(x P^T / sqrt(D)) P (in x's dtype)."""
    p, s = model.prompts.detach().to(x.dtype), model.scale.detach().to(x.dtype)
    attn = torch.softmax(x @ p.T / math.sqrt(p.shape[1]), -1)
    return x + s * (attn @ p)


def slow_maps(run, ids: list[str], exact: bool) -> torch.Tensor:
    """Per test image, per tile: the modulated tile patches against the shots' modulated tile patches (all tiles, or
    the same position), mean distance of the k nearest, bilinear to tile px; then a per-pixel sum / count over the
    tiles covering it (loops), resized to SIZE and smoothed. Distances: the kit's float32 search per tile, or
    (`exact`) float64 brute force."""
    from anomaly_core.data.holdout import shot_rows
    from anomaly_core.kit.knn import knn_search
    from anomaly_core.kit.maps import smooth
    from anomaly_core.kit.patches import cnn_patches
    from anomaly_core.store import FeatureStore

    store, model = FeatureStore(run["feats"]), run["states"]["brick"]
    kcfg = KnnConfig(**run["params"]["knn"])
    k = VptConfig(**VPT).k_neighbors  # vpt_knn's k (overrides knn.k)
    dtype = torch.float64 if exact else torch.float32
    by_id = {r.id: r for r in run["rows"]}

    def tile_patches(rows):  # [N, T, h, w, D] modulated
        feats = store.get("visual", rows)
        levels = [v.float() for key, v in sorted(feats.items()) if key.startswith("level_")]
        n, t = levels[0].shape[:2]
        grid = cnn_patches([lv.flatten(0, 1) for lv in levels], kcfg.patch_aggregate, kcfg.patch_pad).to(dtype)
        return modulate(model, grid.reshape(-1, grid.shape[-1])).reshape(n, t, *grid.shape[1:])

    def knn_distance(q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:  # [Q, D], [M, D] -> [Q]
        if exact:
            return torch.cdist(q, bank).topk(k, largest=False).values.mean(1)
        return knn_search(q, bank, k)[0].sqrt().mean(1)

    shots = tile_patches(shot_rows(run["rows"], "brick"))  # [S, T, h, w, D]
    offsets, (hh, ww) = store.tiles("visual", [by_id[i] for i in ids])
    out = []
    for i in ids:
        test = tile_patches([by_id[i]])[0]  # [T, h, w, D]
        total, count = np.zeros((hh, ww)), np.zeros((hh, ww))
        for j, (y, x) in enumerate(offsets.tolist()):
            bank = shots[:, j] if run["tiling"]["position_aware"] else shots
            patch = knn_distance(test[j].reshape(-1, test.shape[-1]), bank.reshape(-1, bank.shape[-1]))
            patch = patch.float().reshape(1, 1, *test.shape[1:3])
            px = F.interpolate(patch, size=(64, 64), mode="bilinear", align_corners=False)[0, 0].numpy()
            for a in range(64):
                for b in range(64):
                    total[y + a, x + b] += px[a, b]
                    count[y + a, x + b] += 1
        stitched = torch.from_numpy(total / count).float()[None, None]
        out.append(F.interpolate(stitched, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0])
    return smooth(torch.cat(out), kcfg.sigma)


def float32_maps(run, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled machinery score@vpt_knn runs (kit.tiled_knn fit_category / TiledKnn.predict with the prompts as the
    transform), before the stored float16 cast."""
    from anomaly_core.kit.tiled_knn import cached_tile_grids, fit_category
    from anomaly_core.store import FeatureStore

    store, tiling = FeatureStore(run["feats"]), TilingConfig(**run["tiling"])
    kcfg = dataclasses.replace(KnnConfig(**run["params"]["knn"]), k=VptConfig(**VPT).k_neighbors)
    transform = lambda cat, g: run["states"][cat].transform(g)  # noqa: E731
    knn, offsets, hw = fit_category(store, run["rows"], "brick", kcfg, tiling, 0, transform)
    by_id = {r.id: r for r in run["rows"]}
    return knn.predict(cached_tile_grids(store, [by_id[i] for i in ids], kcfg, "brick", transform), offsets, hw, SIZE)


def test_stitched_map_equals_a_slow_per_tile_reference(run):
    ids, image, maps = run["scores"]["test"]["brick"]
    ref, exact = slow_maps(run, ids, exact=False), slow_maps(run, ids, exact=True)
    img32, maps32 = float32_maps(run, ids)
    assert maps32.shape == ref.shape == (len(ids), SIZE, SIZE)
    np.testing.assert_allclose(maps32.numpy(), ref.numpy(), rtol=0, atol=1e-5)
    # against float64 brute force: the float32 search's rounding (||b||^2 - 2 q.b + ||q||^2), measured <= 1.2e-4
    np.testing.assert_allclose(maps32.numpy(), exact.numpy(), rtol=0, atol=3e-4)
    assert torch.equal(maps, maps32.half())  # the score stage's maps: those, stored in float16
    np.testing.assert_allclose(image.numpy(), img32.numpy(), rtol=0, atol=0)
    if run["knn"]["image_score"] == "max":  # the image score from the stitched map
        np.testing.assert_allclose(image.numpy(), ref.flatten(1).max(1).values.numpy(), rtol=0, atol=1e-5)
    assert float(ref.std()) > 0 and len(set(image.tolist())) == len(ids)


# ---------------------------------------------------------------------------- one tile = the untiled path


def test_one_tile_covering_the_image_equals_the_untiled_path(tmp_path):
    """Tile = stride = image side = backbone input = data.image_size: one tile per image, so training (the same
    batch items) and scoring must give what the untiled vpt_knn gives on the same images."""
    side = 96
    tiling = {"enabled": True, "tile": side, "stride": side, "resolution": "native", "position_aware": False}
    knn = {"image_score": "reweight"}
    rows = make_rows(tmp_path, side)
    # batch 1: the untiled features stage encodes each image alone, as the tiled one does (an image's tiles are a
    # batch); with batches of 4 images a few float16 values differ by an ulp and training drifts from them
    untiled = fit_and_score(rows, features(tmp_path, "plain", side, None, 1), knn, None, side, tmp_path / "m0")
    tiled = fit_and_score(rows, features(tmp_path, "tiled", side, tiling), knn, tiling, side, tmp_path / "m1")
    a, b = untiled[0]["brick"], tiled[0]["brick"]
    np.testing.assert_allclose(b.prompts.detach().numpy(), a.prompts.detach().numpy(), rtol=0, atol=1e-6)
    assert untiled[1]["brick"]["best_epoch"] == tiled[1]["brick"]["best_epoch"]
    np.testing.assert_allclose(tiled[1]["brick"]["loss"], untiled[1]["brick"]["loss"], rtol=0, atol=1e-5)
    for split in ("val", "test"):
        (ia, sa, ma), (ib, sb, mb) = untiled[2][split]["brick"], tiled[2][split]["brick"]
        assert ia == ib
        np.testing.assert_allclose(sb.numpy(), sa.numpy(), rtol=0, atol=1e-5)
        # the tiled maps are stored in float16: within its rounding (2^-11 relative) of the untiled float32 maps
        np.testing.assert_allclose(mb.float().numpy(), ma.float().numpy(), rtol=2**-11 + 1e-6, atol=0)
        assert float(ma.float().std()) > 0


# ---------------------------------------------------------------------------- bundle and predict


def write_vpt_bundle(run, out: Path, thresholds: dict) -> dict:
    """The export stage's writer (the generic bundle) on the fixture's tiled vpt_knn -> its card."""
    from anomaly_core.deploy.bundle import BundleInputs
    from anomaly_core.deploy.engines import deploy_module

    export = {"data": {"image_size": SIZE}, "seed": 0, "features": {"dtype": "float16", "batch_size": 4},
              "backbones": {"visual": backbone(64)}, "score": {"vpt_knn": run["params"]}}
    inputs = BundleInputs(rows=run["rows"], features=run["feats"], models=run["root"] / "models", params=export,
                          method="vpt_knn")
    return deploy_module("vpt_knn").write_bundle(inputs, out, {"method": "vpt_knn", "thresholds": thresholds})


def test_predict_on_the_tiled_vpt_bundle_reproduces_the_pipeline_test_scores(run, tmp_path, monkeypatch):
    thresholds = {c: {"image": float(img.median()), "pixel": None} for c, (_, img, _) in run["scores"]["val"].items()}
    card = write_vpt_bundle(run, tmp_path / "src", thresholds)
    assert card["kind"] == "method" and card["score_params"]["tiling"] == run["tiling"] and card["tile_batch"] == 4
    got, image = predict_copy(tmp_path / "src", run["rows"], run["scores"], tmp_path, monkeypatch)
    np.testing.assert_allclose([g["score"] for g in got], image.numpy(), rtol=0, atol=1e-4)


def test_predict_refuses_an_image_of_another_size_in_one_line(run, tmp_path):
    from PIL import Image

    from anomaly_core.deploy.engines import load_predictor
    from anomaly_core.features import load_batch

    write_vpt_bundle(run, tmp_path / "bundle", {})
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "big.png")
    engine = load_predictor(tmp_path / "bundle")
    with pytest.raises(Exception, match=r"big.png: 200x200 px at tiling resolution native.*160x160 px$") as err:
        engine(load_batch([str(tmp_path / "big.png")], 64), "brick", [str(tmp_path / "big.png")])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- validate / stage configs


def test_validate_accepts_tiled_vpt_knn_and_gives_its_fit_and_score_the_tiling():
    import yaml

    from anomaly_core.methods import method_names
    from anomaly_core.pipeline import stage_configs
    from anomaly_core.validation import default_schema, validate_params

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["tiling"]["enabled"], params["methods"] = True, ["zero_shot_clip", "vpt_knn"]
    errors = lambda p: validate_params(p, default_schema(method_names()))  # noqa: E731
    assert errors(params) == []
    configs = stage_configs(params)
    assert configs["fit-vpt_knn"]["tiling"] == configs["score-vpt_knn"]["tiling"] == params["tiling"]
    assert configs["export"]["score"]["vpt_knn"]["tiling"] == params["tiling"]
    off = copy.deepcopy(params)
    off["tiling"]["enabled"] = False  # the default path: no tiling key in vpt_knn's stage configs
    assert "tiling" not in stage_configs(off)["fit-vpt_knn"] and "tiling" not in stage_configs(off)["score-vpt_knn"]
    bad = copy.deepcopy(params)  # vpt_knn scores with the knn section: the tiled kNN's limits apply, naming it
    bad["tiling"]["position_aware"] = True  # knn.image_score: reweight in params.yaml
    assert errors(bad) == ["tiling.position_aware=true with knn.image_score=reweight: the re-weighting needs one "
                           "bank (set knn.image_score to max or topk_mean) (method vpt_knn)"]
