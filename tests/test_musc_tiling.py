"""MuSc on tiles (`tiling.enabled` with `musc.branch: visual`) on a small generated high-resolution tree: the
features stage's cached tiles -> score@musc (the registry's score) against a slow reference (explicit loops over
images and tiles with cdist, manual stitching), one tile covering the image = untiled MuSc, a small memory budget =
one block, validate's acceptance and export / predict's one-line refusal."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from anomaly_core.kit.tiling import TilingConfig

BACKBONE = {"name": "efficientnet_lite0", "pretrained": "random", "levels": [2, 3], "image_size": 64}
SIDE = 160   # generated images (px): tiles of 64 at stride 48 -> 3 x 3 = 9 per image
SIZE = 128   # data.image_size: the stitched maps' side
TILING = {"enabled": True, "tile": 64, "stride": 48, "resolution": "native", "position_aware": False}
MUSC = {"branch": "visual", "aggregate_sizes": [1, 3], "topmin": 0.3, "rescore_k": [2, 3], "sigma": 1.0,
        "max_memory_mb": 256.0}
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def features_run(root: Path, side: int, tiling: dict | None, backbone: dict = BACKBONE):
    """generate_demo (one category, `side` px, defects 3-6 px) -> prepare's rows -> the features stage (CLI), tiled
    when `tiling` is given. Returns (rows, FeatureStore)."""
    from typer.testing import CliRunner

    from anomaly_core.data import manifest as mf
    from anomaly_core.data.demo import generate_demo
    from anomaly_core.data.readers import read_mvtec
    from anomaly_core.io import write_json
    from anomaly_core.store import SOURCE, FeatureStore
    from stages.features import app

    generate_demo(root / "demo", 0, categories=["brick"], n_train=2, n_test_good=3, n_test_defect_per_type=1,
                  size=side, defect_px=(3, 6))
    rows = mf.select_shots(mf.carve_val(read_mvtec(root / "demo", "all"), 0.4, 0), "all", 0)
    mf.write_manifest([dataclasses.replace(r, split=SOURCE[r.split]) for r in rows], root / "images.csv")
    config = {"task": "anomaly", "features": {"batch_size": 4, "dtype": "float16"}, "backbones": {"visual": backbone}}
    if tiling is not None:
        config["tiling"] = tiling
    write_json(root / "features.json", config)
    res = CliRunner().invoke(app, ["--images", str(root / "images.csv"), "--config", str(root / "features.json"),
                                   "--out", str(root / "features")])
    assert res.exit_code == 0, res.output
    return rows, FeatureStore(root / "features")


def musc_scores(rows, store, musc: dict, tiling: dict | None, size: int):
    """score@musc through the registry on the stage's cache: {split: {category: (ids, image, maps)}}."""
    from anomaly_core.methods import get_method
    from anomaly_core.methods.base import context_for

    params = {"seed": 0, "data": {"image_size": size}, "musc": musc, **({"tiling": tiling} if tiling else {})}
    return get_method("musc").score(context_for(get_method("musc"), params, rows, store, Path("unused")), {})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return features_run(tmp_path_factory.mktemp("musc_tiles"), SIDE, TILING)


def pool_rows(rows):
    from anomaly_core.data.manifest import rows_for

    return rows_for(rows, "brick", "val") + rows_for(rows, "brick", "test")


def slow_tiled_musc(levels: list[torch.Tensor], offsets: torch.Tensor, hw, musc: dict, position_aware: bool,
                    tile: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference in float64 with python loops: per LNAMD size, each tile's patches (cnn_patches per tile) against
    every tile (or the same-position tile) of every other image with cdist, nearest per image, mean of the
    smallest floor(topmin (N - 1)); averaged over sizes; each tile's map upsampled, added into a sum and a count
    pixel by tile, divided, resized, smoothed; max; RsCIN by explicit top-k loops."""
    from anomaly_core.kit.maps import smooth
    from anomaly_core.kit.patches import cnn_patches

    n, t = levels[0].shape[:2]
    k = max(1, int(musc["topmin"] * (n - 1)))
    per_size = []
    for r in musc["aggregate_sizes"]:
        g = [[cnn_patches([lvl[i, j][None].float() for lvl in levels], r)[0].double() for j in range(t)]
             for i in range(n)]  # [h, w, D] per image and tile
        h, w, d = g[0][0].shape
        score = torch.zeros(n, t, h, w, dtype=torch.float64)
        for i in range(n):
            for j in range(t):
                q = g[i][j].reshape(-1, d)
                nearest = []
                for o in range(n):
                    if o == i:
                        continue
                    others = [g[o][j]] if position_aware else g[o]
                    nearest.append(torch.cdist(q, torch.cat([x.reshape(-1, d) for x in others])).min(1).values)
                score[i, j] = torch.stack(nearest, 1).sort(1).values[:, :k].mean(1).reshape(h, w)
        per_size.append(score)
    patch = torch.stack(per_size).mean(0)
    total, count = torch.zeros(n, *hw, dtype=torch.float64), torch.zeros(*hw, dtype=torch.float64)
    for j, (y, x) in enumerate(offsets.tolist()):
        total[:, y : y + tile, x : x + tile] += F.interpolate(patch[:, j][:, None], size=(tile, tile),
                                                              mode="bilinear", align_corners=False)[:, 0]
        count[y : y + tile, x : x + tile] += 1
    maps = F.interpolate((total / count)[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps = smooth(maps.float(), musc["sigma"]).double()
    raw = maps.flatten(1).max(1).values
    glob = F.normalize(levels[-1].double().mean(dim=(1, 3, 4)), dim=-1)  # deepest level over every tile
    image = torch.zeros(n, dtype=torch.float64)
    for kk in musc["rescore_k"]:
        for i in range(n):
            sim = glob @ glob[i]
            near = sim.topk(min(kk, n)).indices
            image[i] += (sim[near] * raw[near]).sum() / sim[near].sum() / len(musc["rescore_k"])
    return image, maps


@pytest.mark.parametrize("position_aware", [False, True])
def test_tiled_musc_equals_a_slow_reference(tree, position_aware):
    from anomaly_core.methods.musc import MuscConfig
    from anomaly_core.methods.musc.tiled import tiled_pool

    rows, store = tree
    tiling = {**TILING, "position_aware": position_aware}
    pool = pool_rows(rows)
    offsets, hw = store.tiles("visual", pool)
    assert len(offsets) == 9 and hw == (SIDE, SIDE) and len(pool) >= 4
    levels = store.levels(store.get("visual", pool))
    ref_image, ref_maps = slow_tiled_musc(levels, offsets, hw, MUSC, position_aware, 64, SIZE)
    scores = musc_scores(rows, store, MUSC, tiling, SIZE)  # the score stage's path: float16 maps
    got = {}
    for split in ("val", "test"):
        ids, image, maps = scores[split]["brick"]
        assert maps.shape == (len(ids), SIZE, SIZE) and maps.dtype == torch.float16
        got.update({i: (float(image[n]), maps[n].float()) for n, i in enumerate(ids)})
    image = torch.tensor([got[r.id][0] for r in pool], dtype=torch.float64)
    # float32 norm-trick distances against float64 cdist: 1e-5 relative (scores ~4 here)
    np.testing.assert_allclose(image.numpy(), ref_image.numpy(), rtol=1e-5, atol=1e-6)
    stage_maps = torch.stack([got[r.id][1] for r in pool]).double()
    np.testing.assert_allclose(stage_maps.numpy(), ref_maps.numpy(), rtol=1e-3, atol=1e-4)  # stored float16
    _, maps32 = tiled_pool(store, pool, MuscConfig(**MUSC), TilingConfig(**tiling), SIZE)
    np.testing.assert_allclose(maps32.double().numpy(), ref_maps.numpy(), rtol=1e-5, atol=1e-6)
    assert float(ref_maps.std()) > 0 and len(set(image.tolist())) == len(pool)


def test_the_two_tiled_variants_differ(tree):
    """Same-position tiles only is another comparison than every tile of the other images (the choice matters)."""
    rows, store = tree
    a = musc_scores(rows, store, MUSC, TILING, SIZE)["test"]["brick"][2]
    b = musc_scores(rows, store, MUSC, {**TILING, "position_aware": True}, SIZE)["test"]["brick"][2]
    assert float((a.float() - b.float()).abs().max()) > 1e-3


def untiled_copy(store, out: Path):
    """The cached features of a one-tile run as the untiled features stage writes them ([N, C, h, w], no tile
    metadata): the same numbers, so what differs is the scoring path only (the two stages' batches differ, which
    moves float16 features by a rounding step)."""
    from anomaly_core.io import load_tensors, read_json, save_tensors, write_json
    from anomaly_core.store import FeatureStore

    for f in sorted((store.root / "visual").rglob("*.safetensors")):
        tensors, meta = load_tensors(f)
        assert all(v.shape[1] == 1 for k, v in tensors.items() if k.startswith("level_"))
        save_tensors(out / f.relative_to(store.root), {k: v[:, 0] if k.startswith("level_") else v
                                                       for k, v in tensors.items()},
                     {k: v for k, v in meta.items() if k not in ("tiles", "tiled_hw")})
    info = read_json(store.root / "info.json")
    info["visual"].pop("tiling")
    write_json(out / "info.json", info)
    return FeatureStore(out)


def test_one_tile_covering_the_image_is_untiled_musc(tmp_path):
    """64 px images, one 64 px tile each (= the backbone input, = data.image_size): the tiled path's scores and maps
    are the untiled MuSc's on the same features."""
    tiling = {**TILING, "stride": 64}
    rows, tiled = features_run(tmp_path / "tiled", 64, tiling)
    assert len(tiled.tiles("visual", pool_rows(rows))[0]) == 1
    plain = untiled_copy(tiled, tmp_path / "plain")
    for position_aware in (False, True):
        a = musc_scores(rows, tiled, MUSC, {**tiling, "position_aware": position_aware}, 64)
        b = musc_scores(rows, plain, MUSC, None, 64)
        for split in ("val", "test"):
            (ids_a, img_a, maps_a), (ids_b, img_b, maps_b) = a[split]["brick"], b[split]["brick"]
            assert ids_a == ids_b and maps_b.dtype == torch.float32
            np.testing.assert_allclose(img_a.numpy(), img_b.numpy(), rtol=0, atol=1e-5)
            assert torch.equal(maps_a, maps_b.half())  # the tiled path stores float16 maps, as the score files


def test_a_small_budget_gives_the_one_block_scores(tree):
    """A budget far below the pool's one block: blocks of image rows and, in the pool variant (one image = 9 tiles
    x 64 patches), query patches split within one image pair; the same scores."""
    from anomaly_core.methods.musc.mutual import pair_blocks, query_patches, working_set_bytes

    rows, store = tree
    pool = pool_rows(rows)
    n, p = len(pool), 9 * 8 * 8
    budget = 0.05  # MB
    rows_per_block, chunk = pair_blocks(n, p, 0.3, budget)
    q = query_patches(n, p, 0.3, budget, chunk)
    assert rows_per_block < n and chunk == 1 and q < p  # both splits active
    assert working_set_bytes(rows_per_block, chunk, n, p, 0.3, q) <= budget * 2**20
    assert working_set_bytes(0, chunk, n, p, 0.3) > budget * 2**20 / 2  # unsplit, one pair alone would not fit
    for position_aware in (False, True):
        tiling = {**TILING, "position_aware": position_aware}
        one = musc_scores(rows, store, MUSC, tiling, SIZE)["test"]["brick"]
        small = musc_scores(rows, store, {**MUSC, "max_memory_mb": budget}, tiling, SIZE)["test"]["brick"]
        np.testing.assert_allclose(small[1].numpy(), one[1].numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(small[2].float().numpy(), one[2].float().numpy(), rtol=2**-10, atol=0)  # float16 step


def test_query_split_mutual_scores_equal_one_slice():
    """mutual_scores with i's patches taken a few at a time (running minimum of the columns) = all at once."""
    from anomaly_core.methods.musc.mutual import mutual_scores

    g = torch.Generator().manual_seed(3)
    grid = torch.randn(7, 4, 6, 5, generator=g)
    one = mutual_scores(grid, 0.3)
    ref = torch.stack([torch.stack([torch.cdist(grid[i].reshape(-1, 5).double(), grid[j].reshape(-1, 5).double())
                                    .min(1).values for j in range(7) if j != i], 1).sort(1).values[:, :1].mean(1)
                       for i in range(7)]).reshape(7, 4, 6)
    assert torch.allclose(one.double(), ref, atol=1e-5)
    for query, rows in ((1, None), (5, None), (7, 3), (23, 1)):  # partial last slices, with row blocks
        assert torch.allclose(mutual_scores(grid, 0.3, query=query, rows=rows), one, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- validate, export, predict


def _params():
    return yaml.safe_load(PARAMS.read_text())


def test_validate_accepts_tiled_musc_and_its_stage_config_carries_the_tiling():
    from anomaly_core.methods import method_names
    from anomaly_core.pipeline import stage_configs
    from anomaly_core.validation import default_schema, validate_params

    on = _params()
    on["tiling"]["enabled"] = True
    on["methods"] = ["zero_shot_clip", "knn", "musc"]
    assert on["musc"]["branch"] == "visual"
    assert validate_params(on, default_schema(method_names())) == []
    configs = stage_configs(on)
    assert configs["score-musc"]["tiling"] == on["tiling"] == configs["export"]["score"]["musc"]["tiling"]
    clip = copy.deepcopy(on)
    clip["musc"]["branch"] = "clip"  # CLIP tokens are not tiled: MuSc runs untiled, its config as before
    assert validate_params(clip, default_schema(method_names())) == []
    assert "tiling" not in stage_configs(clip)["score-musc"]


def test_export_and_predict_refuse_a_tiled_musc_in_one_line(tree, tmp_path):
    from anomaly_core.deploy.bundle import BundleInputs
    from anomaly_core.deploy.engines import deploy_module, load_predictor
    from anomaly_core.errors import DataError
    from anomaly_core.io import read_json, write_json

    rows, store = tree
    score = {"seed": 0, "data": {"image_size": SIZE}, "musc": MUSC, "tiling": TILING}
    params = {"data": {"image_size": SIZE}, "seed": 0, "features": {"dtype": "float16", "batch_size": 4},
              "backbones": {"visual": BACKBONE}, "score": {"musc": score}}
    inputs = BundleInputs(rows=rows, features=store.root, models=tmp_path / "none", params=params, method="musc")
    with pytest.raises(DataError, match=r"^export: a tiled musc .* has no bundle") as err:
        deploy_module("musc").write_bundle(inputs, tmp_path / "bundle", {"method": "musc"})
    assert "\n" not in str(err.value) and not (tmp_path / "bundle").exists()
    # untiled: the generic bundle, as before; the same bundle with tiling in its card is refused by predict
    untiled = {**params, "score": {"musc": {k: v for k, v in score.items() if k != "tiling"}}}
    plain_rows, plain_store = features_run(tmp_path / "plain", 64, None)
    plain = dataclasses.replace(inputs, rows=plain_rows, params=untiled, features=plain_store.root)
    card = deploy_module("musc").write_bundle(plain, tmp_path / "bundle", {"method": "musc"})
    assert card["kind"] == "method" and "tiling" not in card["score_params"]
    load_predictor(tmp_path / "bundle")
    edited = read_json(tmp_path / "bundle" / "model.json")
    edited["score_params"]["tiling"] = TILING
    write_json(tmp_path / "bundle" / "model.json", edited)
    with pytest.raises(DataError, match=r"model.json: a tiled musc .* has no bundle") as err:
        load_predictor(tmp_path / "bundle")
    assert "\n" not in str(err.value)
