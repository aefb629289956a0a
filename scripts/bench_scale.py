"""Scale benchmark: the pipeline on an MVTec-AD-sized generated tree, and cost curves (called by scripts/benchmark.py).

    python scripts/benchmark.py --mvtec-size --scale 1.0      # the full size: 15 categories x 240 train, 115 test
    python scripts/benchmark.py --mvtec-size --scale 0.1      # a tenth of every category's images
    python scripts/benchmark.py --curves                      # kNN-only cost vs train images and vs categories, MuSc
    python scripts/benchmark.py --curves --train-grid 16,64 --category-grid 2,4 --musc-pools 50,100,200

Every pipeline run is a `dvc repro` in a fresh temporary copy of the project (stages/, anomaly_core/, dvc.yaml,
params.yaml; git + dvc init) with data.format mvtec and data.root at a generated tree
(anomaly_core.data.demo.mvtec_sized: 5 textures and 10 objects). In that copy only, each stage command is
prefixed with scripts/stage_meter.py, which records the stage's wall seconds and its peak RSS (ru_maxrss of the
stage process); the run's wall time minus the stages' seconds is DVC's own overhead (hashing, locks, checks).
"prepare to evaluate" sums the stages from prepare to evaluate (validate, demo_data, classify and export are
outside it).

The peer is anomalib 2.7.0 PatchCore (coreset 0.1, its default; its own venv, `--peer-python`) on two categories
of the same tree: fed the feature maps of our backbone (the same EfficientNet-Lite0 weights, levels of
backbones.visual) and timed on fit (embedding + coreset) and test (embedding + search + image score); its time per
category is that plus our backbone forward over the category's images, and 15 x the mean is its extrapolated
time for the tree. Its image AUROC is over all test images of those categories (ours is on the test split left
after the val carve: the two are not the same images).

Outputs: the printed tables and bench/{mvtec_size_<scale>.json, curves.json, knn_train.png, knn_categories.png,
musc.png}.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
OUT = Path("bench")  # not reports/bench: reports/ is the evaluate stage's DVC output
PIPELINE = ("prepare", "features", "train_text_adapter", "train_image_adapter", "fit", "score", "fuse", "evaluate")


# ---------------------------------------------------------------------------- trees


def master_tree(root: Path, n_train: int, n_test_good: int, n_defect: int, n_categories: int = 15,
                seed: int = 0) -> list[str]:
    """Generate (once: a stamp file keeps it) the largest tree the run needs; image i of a split is the same image
    whatever the counts, so smaller trees are subsets of it (`subset_tree`). Returns its categories."""
    from anomaly_core.data.demo import generate_demo, mvtec_sized

    cats = mvtec_sized(1.0, n_categories)["categories"]
    want = {"categories": cats, "n_train": n_train, "n_test_good": n_test_good, "n_defect": n_defect, "seed": seed}
    stamp = root / "tree.json"
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return cats
    t0 = time.perf_counter()
    generate_demo(root, seed, cats, n_train=n_train, n_test_good=n_test_good, n_test_defect_per_type=n_defect,
                  size=256)
    stamp.write_text(json.dumps(want))
    print(f"generated {len(cats)} categories x ({n_train} train, {n_test_good} + 4 x {n_defect} test) at 256 px "
          f"in {time.perf_counter() - t0:.0f}s: {root}", flush=True)
    return cats


def subset_tree(master: Path, out: Path, categories: list[str], n_train: int) -> Path:
    """`out`: the master tree's `categories` with their first `n_train` training images and every test image and
    mask (hard links, copies across file systems)."""
    if out.exists():
        shutil.rmtree(out)
    for cat in categories:
        for src in sorted((master / cat).rglob("*.png")):
            rel = src.relative_to(master / cat)
            if rel.parts[0] == "train" and int(src.stem) >= n_train:
                continue
            dst = out / cat / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    return out


# ---------------------------------------------------------------------------- pipeline runs


def make_project(root: Path, overrides: dict) -> Path:
    """A temporary copy of the project at `root` (git + dvc init, committed) with the params `overrides` (dotted
    keys) and every stage command run through scripts/stage_meter.py."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    root.mkdir(parents=True)
    for name in ("stages", "anomaly_core"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("params.yaml", ".dvcignore"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, root / name)
    shutil.copy2(HERE / "stage_meter.py", root / "stage_meter.py")
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    n_cmd = dvc_yaml.count("PYTHONPATH=. python ")
    (root / "dvc.yaml").write_text(dvc_yaml.replace("PYTHONPATH=. python ", "PYTHONPATH=. python stage_meter.py "))
    if n_cmd < 10:
        raise RuntimeError(f"dvc.yaml: expected every stage command to start with 'PYTHONPATH=. python ', {n_cmd} do")
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"unknown param {dotted}")
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "bench@example.com")
    run("git", "config", "user.name", "anomaly_core bench")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    if (REPO / ".dvcignore").is_file():
        shutil.copy2(REPO / ".dvcignore", root / ".dvcignore")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "bench: project copy")
    return root


def run_pipeline(project: Path) -> dict:
    """`dvc repro` in `project`: {"wall": s, "stages": [{stage, seconds, peak_rss_mb}], "metrics": summary.json}."""
    log = project / "stage_meter.jsonl"
    env = {**os.environ, "BENCH_METER_LOG": str(log), "ANOMALY_CORE_PROGRESS": "0"}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    res = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"dvc repro failed in {project} (exit {res.returncode}): " + " | ".join(tail))
    stages = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    summary = project / "metrics" / "summary.json"
    metrics = json.loads(summary.read_text()) if summary.exists() else {}
    return {"wall": wall, "stages": stages, "metrics": {k: v for k, v in metrics.items() if not k.startswith("_")}}


def totals(run: dict) -> dict:
    """Wall, stage seconds, prepare-to-evaluate seconds, DVC overhead (wall - stages), peak RSS (largest stage)."""
    stage_s = sum(s["seconds"] for s in run["stages"])
    core = [s for s in run["stages"] if s["stage"].split("@")[0] in PIPELINE]
    return {"wall_s": round(run["wall"], 1), "stages_s": round(stage_s, 1),
            "prepare_to_evaluate_s": round(sum(s["seconds"] for s in core), 1),
            "dvc_overhead_s": round(run["wall"] - stage_s, 1),
            "peak_rss_mb": max((s["peak_rss_mb"] for s in run["stages"]), default=0.0),
            "prepare_to_evaluate_peak_rss_mb": max((s["peak_rss_mb"] for s in core), default=0.0)}


def print_run(title: str, run: dict) -> dict:
    tot = totals(run)
    print(title, flush=True)
    for s in run["stages"]:
        print(f"   {s['stage']:>28}: {s['seconds']:8.1f}s  peak RSS {s['peak_rss_mb']:8.0f} MB")
    print(f"   {'prepare to evaluate':>28}: {tot['prepare_to_evaluate_s']:8.1f}s  peak RSS "
          f"{tot['prepare_to_evaluate_peak_rss_mb']:8.0f} MB")
    print(f"   {'all stages':>28}: {tot['stages_s']:8.1f}s  peak RSS {tot['peak_rss_mb']:8.0f} MB")
    print(f"   {'dvc repro wall':>28}: {tot['wall_s']:8.1f}s  (DVC overhead {tot['dvc_overhead_s']:.1f}s)", flush=True)
    for method, m in run["metrics"].items():
        if "image_auroc" in m:
            print(f"   {method:>28}: image AUROC {m['image_auroc']:.4f}, pixel AUROC {m.get('pixel_auroc', float('nan')):.4f}")
    return tot


def pipeline_point(work: Path, master: Path, categories: list[str], n_train: int, methods: list[str] | None,
                   name: str) -> dict:
    """One kNN-only (or `methods`) pipeline run on a subset of the master tree; its project copy is removed."""
    tree = subset_tree(master, work / f"tree_{name}", categories, n_train)
    overrides = {"data.format": "mvtec", "data.root": str(tree.resolve()), "data.categories": "all"}
    if methods is not None:
        overrides["methods"] = methods
    project = make_project(work / f"project_{name}", overrides)
    try:
        return run_pipeline(project)
    finally:
        shutil.rmtree(project, ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)


# ---------------------------------------------------------------------------- peer


def _listing(tree: Path, cat: str) -> tuple[list[str], list[str], list[int]]:
    train = sorted(str(p) for p in (tree / cat / "train" / "good").glob("*.png"))
    test, labels = [], []
    for kind in sorted(p.name for p in (tree / cat / "test").iterdir()):
        files = sorted(str(p) for p in (tree / cat / "test" / kind).glob("*.png"))
        test += files
        labels += [int(kind != "good")] * len(files)
    return train, test, labels


def peer_patchcore(tree: Path, categories: list[str], peer_python: str, ratio: float = 0.1) -> list[dict]:
    """anomalib PatchCore per category on our backbone's feature maps: seconds (our forward + its fit + test)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from anomaly_core.backbones import create_backbone
    from anomaly_core.config import BackboneConfig, build
    from anomaly_core.features import extract_features
    from anomaly_core.store import level_list

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    vcfg = build(BackboneConfig, params["backbones"]["visual"], "backbones.visual")
    bb = create_backbone(vcfg.name, vcfg.pretrained, vcfg.levels, vcfg.image_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cat in categories:
            train, test, labels = _listing(tree, cat)
            t0 = time.perf_counter()
            levels = {split: [f.float() for f in level_list(extract_features(bb, paths, 16, torch.float32,
                                                                             progress=False))]
                      for split, paths in (("train", train), ("test", test))}
            t_forward = time.perf_counter() - t0
            inp, out = Path(tmp) / f"{cat}.in.pt", Path(tmp) / f"{cat}.out.pt"
            torch.save({**levels, "ratio": ratio, "seed": 0}, inp)
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
            t0 = time.perf_counter()
            res = subprocess.run([peer_python, str(HERE / "bench_peer_patchcore.py"), str(inp), str(out)], env=env,
                                 capture_output=True, text=True)
            t_proc = time.perf_counter() - t0
            if res.returncode != 0:
                raise RuntimeError(f"peer PatchCore failed on {cat}: {res.stderr.strip().splitlines()[-3:]}")
            got = torch.load(out, weights_only=False)
            row = {"category": cat, "train": len(train), "test": len(test), "forward_s": round(t_forward, 2),
                   "fit_s": round(got["fit_seconds"], 2), "test_s": round(got["test_seconds"], 2),
                   "process_s": round(t_proc, 2), "bank": int(got["bank"]), "coreset": int(got["coreset"]),
                   "image_auroc_all_test": round(float(roc_auc_score(labels, got["image"].numpy())), 4)}
            row["total_s"] = round(row["forward_s"] + row["fit_s"] + row["test_s"], 2)
            print(f"   peer {cat:>14}: forward {row['forward_s']:.1f}s + fit {row['fit_s']:.1f}s (coreset "
                  f"{row['coreset']} of {row['bank']}) + test {row['test_s']:.1f}s = {row['total_s']:.1f}s; "
                  f"image AUROC (all {len(test)} test images) {row['image_auroc_all_test']:.4f}", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- modes


def bench_counts(scale: float) -> dict:
    """Image counts of the MVTec-sized tree at `scale`; the test counts floored at 5 good and 3 per defect type
    (the val carve and the holdouts of the trained methods need a few anomalies per category)."""
    from anomaly_core.data.demo import mvtec_sized

    kw = mvtec_sized(scale)
    return {"n_train": kw["n_train"], "n_test_good": max(5, kw["n_test_good"]),
            "n_defect": max(3, kw["n_test_defect_per_type"])}


def mvtec_size(scale: float, work: Path, peer_python: str | None, peer_categories: int = 2,
               pipelines: tuple[str, ...] = ("knn", "all")) -> dict:
    """The kNN-only and the all-methods pipeline on the MVTec-sized tree at `scale`, and the PatchCore peer."""
    counts = bench_counts(scale)
    master = work / "master"
    cats = master_tree(master, counts["n_train"], counts["n_test_good"], counts["n_defect"])
    n_test = counts["n_test_good"] + 4 * counts["n_defect"]
    print(f"MVTec-AD-sized tree at scale {scale:g}: {len(cats)} categories x {counts['n_train']} train + {n_test} "
          f"test images (full size: 240 + 115)", flush=True)
    result: dict = {"scale": scale, "categories": len(cats), **counts, "n_test": n_test}
    out = OUT / f"mvtec_size_{scale:g}.json"
    if out.exists():  # a run of the other pipeline at the same scale: keep its figures
        result = {**json.loads(out.read_text()), **result}
    if "knn" in pipelines:
        _knn_and_peer(result, work, master, cats, counts, peer_python, peer_categories)
        write_json(out, result)
    if "all" in pipelines:
        full = pipeline_point(work, master, cats, counts["n_train"], None, "all")
        result["all_methods"] = {**print_run("all-methods pipeline (params.yaml methods):", full),
                                 "stages": full["stages"], "metrics": full["metrics"]}
        write_json(out, result)
    return result


def _knn_and_peer(result: dict, work: Path, master: Path, cats: list[str], counts: dict, peer_python: str | None,
                  peer_categories: int) -> None:
    knn = pipeline_point(work, master, cats, counts["n_train"], ["knn"], "knn")
    result["knn"] = {**print_run("kNN-only pipeline (methods: [knn]):", knn), "stages": knn["stages"],
                     "metrics": knn["metrics"]}
    if peer_python:
        peer_cats = [c for c in ("brick", "washer") if c in cats][:peer_categories] or cats[:peer_categories]
        print(f"peer: anomalib PatchCore (coreset 0.1) on {', '.join(peer_cats)}", flush=True)
        rows = peer_patchcore(master, peer_cats, peer_python)
        per_cat = sum(r["total_s"] for r in rows) / len(rows)
        ours = result["knn"]["prepare_to_evaluate_s"]
        result["peer"] = {"rows": rows, "per_category_s": round(per_cat, 2),
                          "extrapolated_s": round(per_cat * len(cats), 1),
                          "knn_speedup": round(per_cat * len(cats) / max(ours, 1e-9), 2)}
        print(f"   peer extrapolated to {len(cats)} categories: {per_cat * len(cats):.0f}s; our kNN-only pipeline "
              f"(prepare to evaluate) {ours:.0f}s: x{result['peer']['knn_speedup']:.2f} faster", flush=True)


def cost_curves(work: Path, train_grid: list[int], category_grid: list[int], curve_categories: int,
                curve_train: int, scale: float, musc_pools: list[int], musc_budget: float) -> dict:
    """kNN-only pipeline seconds (prepare to evaluate) and peak RSS vs training images per category (on
    `curve_categories` categories) and vs categories (at `curve_train` training images); each curve's fitted
    exponent; the MuSc pool-size curve (scripts/benchmark.py musc_sweep). Test images per category: `scale` of 115."""
    from benchmark import fit_exponent, musc_sweep, plot_curve

    counts = bench_counts(scale)
    master = work / "master"
    n_cat = max([*category_grid, curve_categories])
    cats = master_tree(master, max([*train_grid, curve_train]), counts["n_test_good"], counts["n_defect"], n_cat)
    n_test = counts["n_test_good"] + 4 * counts["n_defect"]
    out: dict = {"test_images_per_category": n_test}
    for key, xs, label, point in (
        ("train", train_grid, "training images per category", lambda x: (cats[:curve_categories], x)),
        ("categories", category_grid, "categories", lambda x: (cats[:x], curve_train)),
    ):
        fixed = (f"{curve_categories} categories" if key == "train" else f"{curve_train} training images") + \
            f", {n_test} test images per category"
        print(f"kNN-only pipeline vs {label} ({fixed}):", flush=True)
        rows = []
        for x in xs:
            sub_cats, n_train = point(x)
            tot = totals(pipeline_point(work, master, sub_cats, n_train, ["knn"], f"{key}{x}"))
            rows.append({"x": x, **tot})
            print(f"   {x:>5}: prepare to evaluate {tot['prepare_to_evaluate_s']:7.1f}s, dvc repro wall "
                  f"{tot['wall_s']:7.1f}s, peak RSS {tot['prepare_to_evaluate_peak_rss_mb']:6.0f} MB", flush=True)
        curve = {"fixed": fixed, "rows": rows}
        if len(xs) > 1:
            ys_t = [r["prepare_to_evaluate_s"] for r in rows]
            ys_w = [r["wall_s"] for r in rows]
            ys_m = [r["prepare_to_evaluate_peak_rss_mb"] for r in rows]
            curve["exponents"] = {"time": round(fit_exponent(xs, ys_t), 3), "wall": round(fit_exponent(xs, ys_w), 3),
                                  "peak_rss": round(fit_exponent(xs, ys_m), 3)}
            e = curve["exponents"]
            print(f"   fitted exponents vs {label}: time {e['time']:.2f} (dvc repro wall {e['wall']:.2f}), "
                  f"peak RSS {e['peak_rss']:.2f}")
            plot = plot_curve(f"knn_{key}", label, xs, {"seconds (prepare to evaluate)": ys_t, "peak RSS MB": ys_m})
            print(f"   plot: {plot}", flush=True)
        out[key] = curve
    if musc_pools:
        musc_sweep(musc_pools, musc_budget, 152)
    write_json(OUT / "curves.json", out)
    return out


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
