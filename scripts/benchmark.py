"""Benchmark: feature-extraction throughput next to the bare backbone forward, kNN scoring time, stage times.

    python scripts/benchmark.py                 # micro-benchmarks on the prepared images + kNN bank sweep
    python scripts/benchmark.py --stages        # also time every DVC stage (forces a re-run of each)
    python scripts/benchmark.py --knn-only      # only the kNN bank sweep and coreset timing (no data needed)
    python scripts/benchmark.py --predict       # predict (kNN bundle, coreset 0.1) vs the bare backbone forward
    python scripts/benchmark.py --musc          # MuSc pair loop: time and peak memory vs pool size (no data needed)
    python scripts/benchmark.py --mvtec-size --scale 0.1   # kNN-only + all-methods pipeline on an MVTec-AD-sized tree
    python scripts/benchmark.py --curves        # kNN-only pipeline cost vs train images / categories, MuSc vs pool

    python scripts/benchmark.py --overhead      # stage start-up + imports, dvc repro with nothing to do
    python scripts/benchmark.py --overhead --overhead-full   # also dvc repro -f split into compute and overhead

--mvtec-size and --curves live in scripts/bench_scale.py (see its docstring).

The kNN sweep scores `--queries` images of 28 x 28 patches (224 px, stride 8) x 152 dims against random banks
of 10k / 50k / 200k patches: images/s and the peak resident-memory growth of the search (Linux VmHWM after a
reset; the bank itself is allocated before the reset), next to the one-matrix-per-image kernel it replaced.

The MuSc curve scores random pools of `--musc-pools` images (`--musc-grid`^2 patches x `--musc-dim` dims) under
`--musc-budget` MB (musc.max_memory_mb) and prints seconds, the peak resident-memory growth of the pair loop and
the fitted exponent of each against the pool size (log-log least squares; plotted to bench/musc.png);
then the 200-image pool once more in one block (the unblocked path: every pair once, memory ~ N^2) as the baseline.

Run from the repository root after `dvc repro` (it reads data/prepared/images.csv and params.yaml).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import typer
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core.backbones import create_backbone, preprocess  # noqa: E402
from anomaly_core.config import BackboneConfig, build
from anomaly_core.data import manifest as mf  # noqa: E402
from anomaly_core.features import extract_features, iter_batches  # noqa: E402
from anomaly_core.kit.knn import (
    KnnConfig,  # noqa: E402
    PatchKnn,
    greedy_coreset,
    greedy_coreset_reference,
)
from anomaly_core.kit.patches import cnn_patches  # noqa: E402
from anomaly_core.store import level_list  # noqa: E402

app = typer.Typer(add_completion=False)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


@torch.no_grad()
def bare_forward(bb, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        bb(preprocess(batch, bb.image_size, bb.mean, bb.std))


def fixed_mmap_threshold() -> None:
    """glibc: serve every allocation >= 64 KB by mmap and unmap it on free (M_MMAP_THRESHOLD = -3), so that
    freed tensors leave the resident set and the peak-RSS growth of one call measures that call's working set."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    except OSError:
        pass


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS in bytes (0 elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return 0


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_growth(base: int) -> float:
    """MB the peak RSS rose above `base` since `reset_peak_rss`."""
    return max(0, _status_kb("VmHWM") * 1024 - base) / 2**20 if base else float("nan")


def naive_distances(grid: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The kernel PatchKnn replaced: one full [h*w, M] distance matrix per image. grid [N, h, w, D] -> [N, h, w]."""
    bank_sq = (bank * bank).sum(1)
    out = []
    for x in grid:
        q = x.reshape(-1, x.shape[-1])
        d2 = (q * q).sum(1, keepdim=True) + bank_sq[None] - 2.0 * q @ bank.T
        out.append(d2.min(dim=1).values.clamp_min(0).sqrt().reshape(x.shape[:2]))
    return torch.stack(out)


def knn_sweep(kcfg: KnnConfig, banks: list[int], n_queries: int, dim: int = 152, grid: int = 28,
              coreset_bank: int = 50_176) -> None:
    """Images/s and peak memory of exact kNN scoring per bank size; coreset seconds for 10 % of `coreset_bank`."""
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(n_queries, grid, grid, dim, generator=g)
    print(f"kNN exact search, {n_queries} images x {grid * grid} patches x {dim} dims, "
          f"k={kcfg.k}, max_memory_mb={kcfg.max_memory_mb:g}, threads {torch.get_num_threads()}")
    for m in banks:
        knn = PatchKnn(torch.randn(m, dim, generator=g), replace(kcfg, index="exact"))
        knn.distances(queries[:1])  # warm-up
        base = reset_peak_rss()
        t, _ = timed(knn.distances, queries)
        peak = peak_rss_growth(base)
        line = f"   bank {m:>7}: {n_queries / t:6.2f} img/s, peak search memory +{peak:7.1f} MB"
        if importlib.util.find_spec("faiss") is not None:  # knn.index: faiss (optional extra), same neighbours
            fknn = PatchKnn(knn.bank, replace(kcfg, index="faiss"))
            fknn.distances(queries[:1])
            base = reset_peak_rss()
            t_faiss, _ = timed(fknn.distances, queries)
            line += f" | faiss IndexFlatL2 {n_queries / t_faiss:6.2f} img/s, +{peak_rss_growth(base):7.1f} MB"
        if m <= 60_000:
            base = reset_peak_rss()
            t_naive, _ = timed(naive_distances, queries, knn.bank)
            line += (f" | one-matrix-per-image kernel {n_queries / t_naive:6.2f} img/s, "
                     f"+{peak_rss_growth(base):7.1f} MB (x{t_naive / t:.2f} slower)")
        print(line, flush=True)
    bank = torch.randn(coreset_bank, dim, generator=g)
    t_core, idx = timed(greedy_coreset, bank, 0.1, 0, kcfg.coreset_dim)
    print(f"   coreset: {len(idx)} of {bank.shape[0]} x {dim} (projection {kcfg.coreset_dim}) in {t_core:.2f}s")
    small = bank[:min(10_000, coreset_bank)]
    t_fast, a = timed(greedy_coreset, small, 0.1, 0, kcfg.coreset_dim)
    t_ref, b = timed(greedy_coreset_reference, small, 0.1, 0, kcfg.coreset_dim)
    print(f"   coreset 10 % of 10k: {t_fast:.2f}s, one-cdist-per-pick reference {t_ref:.2f}s (x{t_ref / t_fast:.1f}), "
          f"same picks: {bool(torch.equal(a, b))}")


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Slope of log y against log x (least squares): the cost's exponent in the size."""
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(np.maximum(ys, 1e-9)), 1)[0])


def plot_curve(name: str, xlabel: str, xs: list[float], series: dict[str, list[float]]) -> Path:
    """bench/<name>.png: one log-log panel per series (its fitted exponent in the title). bench/ lies outside every
    DVC output: reports/ is the evaluate stage's, which DVC empties before evaluate runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), squeeze=False)
    for ax, (label, ys) in zip(axes[0], series.items()):
        ax.loglog(xs, ys, "o-")
        ax.set_xlabel(xlabel), ax.set_ylabel(label)
        ax.set_title(f"{label}: exponent {fit_exponent(xs, ys):.2f}")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path("bench") / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def musc_sweep(pools: list[int], budget_mb: float, dim: int, grid: int = 28, topmin: float = 0.3,
               baseline_pool: int = 200) -> None:
    """MuSc mutual scoring under `budget_mb`: seconds and peak memory growth per pool size, fitted exponents,
    and the one-block (unblocked) path on `baseline_pool` images as the same-run baseline."""
    from anomaly_core.methods.musc.mutual import mutual_scores, pair_blocks

    g = torch.Generator().manual_seed(0)
    print(f"MuSc pair loop, {grid}x{grid} patches x {dim} dims, topmin {topmin}, max_memory_mb={budget_mb:g}, "
          f"threads {torch.get_num_threads()}")
    mutual_scores(torch.randn(4, grid, grid, dim, generator=g), topmin)  # warm-up
    times, peaks = [], []
    for n in pools:
        pool = torch.randn(n, grid, grid, dim, generator=g)
        rows, chunk = pair_blocks(n, grid * grid, topmin, budget_mb)
        base = reset_peak_rss()
        t, _ = timed(mutual_scores, pool, topmin, max_memory_mb=budget_mb)
        peak = peak_rss_growth(base)
        times.append(t), peaks.append(peak)
        print(f"   pool {n:>4}: {t:8.2f}s, peak pair-loop memory +{peak:7.1f} MB "
              f"({rows} images per block, {chunk} per product)", flush=True)
        del pool
    if len(pools) > 1:
        big = [i for i, n in enumerate(pools) if n >= 100] or list(range(len(pools)))
        xs = [pools[i] for i in big]
        print(f"   fitted exponents vs pool size: time {fit_exponent(pools, times):.2f}; "
              f"memory {fit_exponent(xs, [peaks[i] for i in big]):.2f} (pools {xs[0]}-{xs[-1]})")
        print(f"   plot: {plot_curve('musc', 'pool size (images)', pools, {'seconds': times, 'peak MB': peaks})}")
    if baseline_pool in pools:
        pool = torch.randn(baseline_pool, grid, grid, dim, generator=g)
        base = reset_peak_rss()
        t1, _ = timed(mutual_scores, pool, topmin, rows=baseline_pool)
        i = pools.index(baseline_pool)
        print(f"   pool {baseline_pool} in one block (unblocked): {t1:.2f}s, +{peak_rss_growth(base):.1f} MB; "
              f"blocked / unblocked time x{times[i] / t1:.2f}")


def bench_knn_bundle(root: Path, params: dict, n_train: int, n_test: int, coreset: float = 0.1
                     ) -> tuple[Path, list[str], str]:
    """A kNN bundle (params.yaml's backbone and knn section, `coreset` ratio) of one generated demo category:
    `n_train` shots at 256 px, `n_test` good + defect test images. Returns (bundle, test image paths, category)."""
    from dataclasses import asdict

    from anomaly_core.data.demo import generate_demo
    from anomaly_core.data.readers import read_mvtec
    from anomaly_core.deploy.bundle import BundleInputs
    from anomaly_core.deploy.engines import deploy_module
    from anomaly_core.io import save_tensors, write_json

    cat = generate_demo(root / "tree", 0, None, n_train, n_test // 2, max(1, n_test // 8), 256)[0]
    rows = mf.select_shots([r for r in read_mvtec(root / "tree", [cat])], "all", 0)
    vcfg = build(BackboneConfig, params["backbones"]["visual"], "backbones.visual")
    bb = create_backbone(vcfg.name, vcfg.pretrained, vcfg.levels, vcfg.image_size)
    train = [r for r in rows if r.split == "train"]
    feats = extract_features(bb, [r.image for r in train], 16, torch.float16, progress=False)
    save_tensors(root / "features" / "visual" / cat / "train.safetensors", feats, {"ids": [r.id for r in train]})
    write_json(root / "features" / "info.json", {"visual": {"name": bb.name}})
    kcfg = replace(build(KnnConfig, params.get("knn"), "knn"), coreset_ratio=coreset, branch="visual")
    bp = {"data": {"image_size": params["data"]["image_size"]}, "seed": 0, "features": {"dtype": "float16"},
          "backbones": {"visual": params["backbones"]["visual"]}, "score": {"knn": {"knn": asdict(kcfg)}}}
    inputs = BundleInputs(rows=rows, features=root / "features", models=root / "models", params=bp, method="knn")
    deploy_module("knn").write_bundle(inputs, root / "bundle", {"method": "knn", "thresholds": {cat: {"image": 0.0}}})
    return root / "bundle", [r.image for r in rows if r.split == "test"][:n_test], cat


def bare_forward_threads(bb, batches: list[torch.Tensor], workers: int) -> None:
    """The bare forward in predict's layout: `workers` batches at once, one torch thread each."""
    from concurrent.futures import ThreadPoolExecutor

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(lambda b: bare_forward(bb, [b]), batches))
    finally:
        torch.set_num_threads(prev)


@torch.no_grad()
def predict_breakdown(model, paths: list[str], cat: str, batch_size: int) -> dict[str, float]:
    """Seconds per step of predict's hot path, one batch at a time on torch's threads (no overlap): decode+resize,
    preprocess, backbone, cast to the cache dtype + patch descriptors, kNN search + maps + image scores."""
    from anomaly_core.features import load_batch

    bb, out = model.backbone, dict.fromkeys(("decode", "preprocess", "backbone", "descriptors", "knn"), 0.0)
    for i in range(0, len(paths), batch_size):
        t0 = time.perf_counter()
        images = load_batch(paths[i : i + batch_size], model.image_size)
        t1 = time.perf_counter()
        x = preprocess(images, bb.image_size, bb.mean, bb.std)
        t2 = time.perf_counter()
        feats = bb(x)
        t3 = time.perf_counter()
        grid = model.descriptors([lvl.to(model.dtype).float() for lvl in feats["levels"]])
        t4 = time.perf_counter()
        model.knn(cat).predict(grid, model.size)
        t5 = time.perf_counter()
        for key, dt in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            out[key] += dt
    return out


def predict_bench(params: dict, n_train: int, n_test: int, batch_size: int, repeats: int = 3) -> None:
    """predict's images/s on a kNN bundle (coreset 0.1) next to the bare backbone forward on the same images
    (already decoded) in the same run, rounds interleaved (the shared machine's load drifts; best of `repeats`):
    the bare forward on torch's threads (one batch at a time) and in predict's layout (one batch per thread),
    predict with its default workers and with one (the previous layout); the hot path's time per step; the
    single-image latency (decode to score) p50 / p99."""
    import tempfile

    import numpy as np

    from anomaly_core.deploy.engines import load_predictor
    from anomaly_core.deploy.predict import predict_files
    from anomaly_core.features import load_batch

    with tempfile.TemporaryDirectory() as tmp:
        bundle, paths, cat = bench_knn_bundle(Path(tmp), params, n_train, n_test)
        model = load_predictor(bundle)
        bb, threads = model.backbone, torch.get_num_threads()
        batches = [load_batch(paths[i : i + batch_size], bb.image_size) for i in range(0, len(paths), batch_size)]
        bare_forward(bb, batches[:1])  # warm-up
        predict_files(bundle, paths[:batch_size], Path(tmp) / "warm", cat, batch_size=batch_size, progress=False)
        runs: dict[str, list[float]] = {"bare": [], "bare_layout": [], "predict": [], "predict_1": [],
                                        "predict_heatmaps": []}
        for _ in range(repeats):
            runs["bare"].append(timed(bare_forward, bb, batches)[0])
            runs["bare_layout"].append(timed(bare_forward_threads, bb, batches, threads)[0])
            runs["predict"].append(timed(predict_files, bundle, paths, Path(tmp) / "out", cat, batch_size=batch_size,
                                         progress=False, workers=threads)[0])
            runs["predict_1"].append(timed(predict_files, bundle, paths, Path(tmp) / "out1", cat,
                                           batch_size=batch_size, progress=False, workers=1)[0])
            runs["predict_heatmaps"].append(timed(predict_files, bundle, paths, Path(tmp) / "outh", cat,
                                                  batch_size=batch_size, progress=False, heatmaps=True,
                                                  workers=threads)[0])
        best = {k: min(v) for k, v in runs.items()}
        steps = predict_breakdown(model, paths, cat, batch_size)
        lat = []
        for p in paths[: min(len(paths), 40)]:
            t0 = time.perf_counter()
            model(load_batch([p], model.image_size), cat, [p])
            lat.append(time.perf_counter() - t0)
        p50, p99 = np.percentile(np.array(lat) * 1e3, [50, 99])
        n = len(paths)
        rate = {k: n / v for k, v in best.items()}
        print(f"predict, kNN bundle (coreset 0.1, bank {model.bank(cat).shape[0]} x {model.bank(cat).shape[1]}), "
              f"{n} images 256 px -> {bb.image_size}, batch {batch_size}, threads {threads}, best of {repeats}:")
        print(f"   bare backbone forward {rate['bare']:6.1f} img/s (torch threads) | {rate['bare_layout']:6.1f} img/s "
              f"({threads} batches at 1 thread each)", flush=True)
        print(f"   predict --workers {threads} {rate['predict']:6.1f} img/s: ratio {rate['predict'] / rate['bare']:.2f} to the bare forward, "
              f"{rate['predict'] / rate['bare_layout']:.2f} to the bare forward in its layout | one batch at a time "
              f"(workers=1) {rate['predict_1']:6.1f} img/s, ratio {rate['predict_1'] / rate['bare']:.2f} | with "
              f"heatmaps {rate['predict_heatmaps']:6.1f} img/s, ratio {rate['predict_heatmaps'] / rate['bare']:.2f}")
        total = sum(steps.values())
        print("   hot path, one batch at a time: " + ", ".join(f"{k} {v:.2f}s ({v / total:.0%})" for k, v in steps.items()))
        print(f"   single image (decode to score) p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)


def _wall(cmd: list[str], env: dict | None = None) -> float:
    """Seconds of one subprocess run (output discarded; a failure stops the benchmark with its stderr)."""
    import os

    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def stage_scripts() -> dict[str, str]:
    """{stage name as `dvc stage list` expands it (fit@knn, ...): its script module (stages.fit)} from dvc.yaml."""
    import re

    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    names = subprocess.run(["dvc", "stage", "list", "--name-only"], check=True, capture_output=True,
                           text=True).stdout.split()
    out = {}
    for name in names:
        spec = stages[name.split("@")[0]]
        cmd = (spec.get("do") or spec)["cmd"]
        out[name] = "stages." + re.search(r"stages/(\w+)\.py", cmd).group(1)
    return out


def stage_overhead(full: bool, repeats: int = 2) -> None:
    """The demo `dvc repro` split into the stages' compute and the overhead around it, in one run:

    - process start-up: `python -c pass`, and per stage script `python -c "import stages.<x>"` (interpreter +
      its module-level imports; best of `repeats`), summed over the stages `dvc stage list` expands;
    - DVC with nothing to do: `dvc status` and `dvc repro` on an up-to-date workspace (lock and hash checks);
    - with `full`: `dvc repro -f` with ANOMALY_CORE_STAGE_TIMES set, so each stage process records its start-up
      (process start to its main) and its main's seconds; overhead = repro wall - the mains' seconds, split into
      the processes' start-up and DVC's own share (the rest)."""
    import json
    import sys
    import tempfile
    from collections import Counter

    py = sys.executable
    scripts = stage_scripts()
    env = {"PYTHONPATH": "."}
    t_py = min(_wall([py, "-c", "pass"]) for _ in range(repeats))
    imports = {m: min(_wall([py, "-c", f"import {m}"], env) for _ in range(repeats)) for m in sorted(set(scripts.values()))}
    counts = Counter(scripts.values())
    t_imports = sum(imports[m] * n for m, n in counts.items())
    print(f"stage overhead, {len(scripts)} stages, best of {repeats}: python start-up {t_py:.2f}s")
    for m, t in sorted(imports.items(), key=lambda kv: -kv[1]):
        print(f"   {m:>28} x{counts[m]:<2}: start-up + imports {t:6.2f}s")
    print(f"   start-up + imports over all stages: {t_imports:.1f}s")
    status = subprocess.run(["dvc", "status"], capture_output=True, text=True)
    t_status = min(_wall(["dvc", "status"]) for _ in range(repeats))
    if "up to date" in status.stdout:
        t_noop = min(_wall(["dvc", "repro"]) for _ in range(repeats))
        print(f"   dvc status {t_status:.2f}s | dvc repro with nothing to do {t_noop:.2f}s")
    else:
        t_noop = float("nan")
        print(f"   dvc status {t_status:.2f}s | the workspace is not up to date: run `dvc repro` first for the "
              f"nothing-to-do figure")
    if not full:
        return
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "stages.jsonl"
        wall = _wall(["dvc", "repro", "-f"], {"ANOMALY_CORE_STAGE_TIMES": str(times)})
        runs = [json.loads(line) for line in times.read_text().splitlines()]
    compute = sum(r["compute_s"] for r in runs)
    startup = sum(r["startup_s"] for r in runs)
    for r in runs:
        print(f"   stage {r['stage']:>20}: start-up + imports {r['startup_s']:6.2f}s, main {r['compute_s']:7.2f}s")
    over = wall - compute
    print(f"   dvc repro -f {wall:.1f}s: stages' mains {compute:.1f}s ({compute / wall:.0%}), overhead {over:.1f}s "
          f"({over / wall:.0%}) = stage processes' start-up + imports {startup:.1f}s + DVC {wall - compute - startup:.1f}s "
          f"({len(runs)} stage processes)", flush=True)


@app.command()
def main(images: Path = Path("data/prepared/images.csv"), limit: int = 128, batch_size: int = 16,
         stages: bool = typer.Option(False, help="also time each DVC stage with `dvc repro -s -f`"),
         knn_only: bool = typer.Option(False, help="only the kNN bank sweep and the coreset timing"),
         banks: str = typer.Option("10000,50000,200000", help="bank sizes of the kNN sweep (comma-separated)"),
         queries: int = typer.Option(16, help="query images of the kNN sweep"),
         predict: bool = typer.Option(False, help="only predict (kNN bundle) vs the bare backbone forward"),
         predict_images: int = typer.Option(96, help="test images of the predict benchmark"),
         musc: bool = typer.Option(False, help="only the MuSc pool-size curve (time, peak memory, exponents)"),
         musc_pools: str = typer.Option("50,100,200,400", help="pool sizes of the MuSc curve (comma-separated)"),
         musc_budget: float = typer.Option(64.0, help="musc.max_memory_mb of the MuSc curve"),
         musc_dim: int = typer.Option(152, help="patch descriptor dims of the MuSc curve"),
         musc_grid: int = typer.Option(28, help="patches per side of the MuSc curve's images"),
         coreset_bank: int = typer.Option(50_176, help="bank rows of the coreset timing"),
         mvtec_size: bool = typer.Option(False, help="only the kNN-only and all-methods pipelines on an MVTec-AD-sized "
                                                     "generated tree (+ anomalib PatchCore on two categories)"),
         scale: float = typer.Option(1.0, help="--mvtec-size: fraction of the 240 train / 115 test images per category"),
         pipelines: str = typer.Option("knn,all", help="--mvtec-size: knn (methods [knn], and the peer), all "
                                                       "(params.yaml's methods), or both"),
         peer_python: str = typer.Option("/tmp/fidelity/anomalib/bin/python",
                                         help="--mvtec-size: python of the anomalib venv ('' = no peer)"),
         curves: bool = typer.Option(False, help="only the cost curves (kNN-only pipeline vs train images and vs "
                                                 "categories, MuSc vs pool size), plotted to bench/"),
         train_grid: str = typer.Option("16,64,240", help="--curves: training images per category"),
         category_grid: str = typer.Option("4,8,15", help="--curves: categories"),
         curve_categories: int = typer.Option(4, help="--curves: categories of the training-images curve"),
         curve_train: int = typer.Option(64, help="--curves: training images per category of the categories curve"),
         curve_scale: float = typer.Option(0.1, help="--curves: test images per category, as a fraction of 115"),
         work: Path = typer.Option(Path("/tmp/anomaly_core_bench_scale"),
                                   help="--mvtec-size / --curves: scratch directory (generated trees kept)"),
         overhead: bool = typer.Option(False, help="only the demo pipeline's stage overhead (start-up, imports, DVC)"),
         overhead_full: bool = typer.Option(False, help="with --overhead: also `dvc repro -f` split into compute and "
                                                        "overhead (re-runs every stage)")) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    if mvtec_size or curves:
        import bench_scale

        fixed_mmap_threshold()

        if mvtec_size:
            bench_scale.mvtec_size(scale, work, peer_python or None, pipelines=pipelines.split(","))
        if curves:
            bench_scale.cost_curves(work / "curves", ints(train_grid), ints(category_grid), curve_categories,
                                    curve_train, curve_scale, ints(musc_pools), musc_budget)
        return
    kcfg = build(KnnConfig, params.get("knn"), "knn")
    fixed_mmap_threshold()
    if overhead:
        stage_overhead(overhead_full)
        return
    if predict:
        predict_bench(params, 32, predict_images, batch_size)
        return
    if musc:
        musc_sweep([int(n) for n in musc_pools.split(",") if n], musc_budget, musc_dim, musc_grid)
        return
    knn_sweep(kcfg, [int(b) for b in banks.split(",") if b], queries, coreset_bank=coreset_bank)
    if knn_only:
        return
    rows = mf.read_manifest(images)[:limit]
    paths = [r.image for r in rows]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(paths)} images")
    for branch in ("visual", "clip"):
        raw = params["backbones"].get(branch)
        if not raw:
            continue
        cfg = build(BackboneConfig, raw, f"backbones.{branch}")
        bb = create_backbone(cfg.name, cfg.pretrained, cfg.levels, cfg.image_size)
        batches = list(iter_batches(paths, bb.image_size, batch_size))
        bare_forward(bb, batches[:1])  # warm-up
        t_bare, _ = timed(bare_forward, bb, batches)
        t_feat, feats = timed(extract_features, bb, paths, batch_size, progress=False)
        print(f"{branch:>6} {cfg.name}: bare forward {len(paths) / t_bare:7.1f} img/s | "
              f"extract_features (decode+resize+forward+store) {len(paths) / t_feat:7.1f} img/s")
        if branch == "visual":
            grid = cnn_patches(level_list(feats), kcfg.patch_aggregate)
            n_bank = max(1, len(paths) // 2)
            t_bank, knn = timed(PatchKnn.fit, grid[:n_bank], kcfg, 0)
            t_score, _ = timed(knn.distances, grid[n_bank:])
            n_q = grid.shape[0] - n_bank
            print(f"   kNN: bank {knn.bank.shape[0]} patches x {knn.bank.shape[1]} dims built in {t_bank:.2f}s; "
                  f"scored {n_q} images in {t_score:.2f}s ({n_q / max(t_score, 1e-9):.1f} img/s)")
            for ratio in (0.1,):
                t_core, knn_c = timed(PatchKnn.fit, grid[:n_bank], replace(kcfg, coreset_ratio=ratio), 0)
                t_sc, _ = timed(knn_c.distances, grid[n_bank:])
                print(f"   kNN coreset {ratio}: bank {knn_c.bank.shape[0]} built in {t_core:.2f}s; "
                      f"scored in {t_sc:.2f}s ({n_q / max(t_sc, 1e-9):.1f} img/s)")
    if stages:
        time_stages()


def time_stages() -> None:
    """Force-run each stage alone, in pipeline order, and print its wall time."""
    names = subprocess.run(["dvc", "stage", "list", "--name-only"], check=True, capture_output=True,
                           text=True).stdout.split()  # foreach stages expanded: fit@knn, score@knn, ...
    total = 0.0
    for name in names:
        t0 = time.perf_counter()
        subprocess.run(["dvc", "repro", "-s", "-f", name], check=True, capture_output=True)
        dt = time.perf_counter() - t0
        total += dt
        print(f"stage {name:>20}: {dt:6.1f}s")
    print(f"stage {'total':>20}: {total:6.1f}s")


if __name__ == "__main__":
    app()
