"""Issue 17 (trust, part B): atomic outputs (bundle swap, ONNX, incremental predictions.csv, group-readable files,
collect outside DVC outputs) and predict's refusals, through the real CLI; kill -9 at several points of an export
and of a predict never leaves a partial bundle, and a resumed predict writes the uninterrupted run's CSV."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import stat
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anomaly_core.cli import app

REPO = Path(__file__).resolve().parents[1]


def _tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny kNN run (test_export.tiny_knn_run) with its manifest on disk and its bundle written by the real
    `install_bundle` (the export stage's last step): (root, rows, bundle dir)."""
    from test_export import BACKBONE, SIZE, tiny_knn_run

    from anomaly_core.data.manifest import write_manifest
    from anomaly_core.deploy.bundle import BundleInputs
    from anomaly_core.deploy.engines import deploy_module
    from anomaly_core.deploy.export import install_bundle

    root = tmp_path_factory.mktemp("trust")
    rows, store, cfg, scores = tiny_knn_run(root)
    write_manifest(rows, root / "manifest.csv")
    thresholds = {c: {"image": float(img.median()), "pixel": None} for c, (_, img, _) in scores["val"].items()}
    params = {"data": {"image_size": SIZE}, "seed": 0, "features": {"dtype": "float16"},
              "backbones": {"visual": BACKBONE}, "score": {"knn": {"knn": asdict(cfg)}}}
    (root / "params.json").write_text(json.dumps({"params": params, "thresholds": thresholds}))
    inputs = BundleInputs(rows=rows, features=store.root, models=root / "models" / "knn", params=params, method="knn")
    install_bundle(root / "models" / "export",
                   lambda d: deploy_module("knn").write_bundle(inputs, d, {"method": "knn", "thresholds": thresholds}))
    return root, rows, root / "models" / "export"


def _fork(target, *args):
    """A forked child running `target(*args)` (the modules are already imported: no start-up per kill)."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _exporter(root: Path):
    """A function exporting the tiny bundle with the real `install_bundle` (the export stage's last step)."""
    from anomaly_core.data.manifest import read_manifest
    from anomaly_core.deploy.bundle import BundleInputs
    from anomaly_core.deploy.engines import deploy_module
    from anomaly_core.deploy.export import install_bundle

    cfg = json.loads((root / "params.json").read_text())
    inputs = BundleInputs(rows=read_manifest(root / "manifest.csv"), features=root / "features",
                          models=root / "models" / "knn", params=cfg["params"], method="knn")
    card = {"method": "knn", "thresholds": cfg["thresholds"]}
    return lambda: install_bundle(root / "models" / "export", lambda d: deploy_module("knn").write_bundle(inputs, d, card))


def _export_forever(root: Path, ready) -> None:
    """Export again and again: a kill lands at a random point of some export."""
    import torch

    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork
    export = _exporter(root)
    ready.set()
    while True:
        export()


def _export_killed_at(root: Path, k: int, count) -> None:
    """Export twice, SIGKILL-ing this process just before its k-th file-system move or delete (os.rename,
    os.replace, os.unlink, shutil.rmtree: every step of writing and swapping a bundle); `count` gets the total."""
    import shutil

    import torch

    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork

    def hooked(fn):
        def call(*a, **kw):
            count.value += 1
            if count.value == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return call

    os.rename, os.replace, os.unlink, shutil.rmtree = map(hooked, (os.rename, os.replace, os.unlink, shutil.rmtree))
    export = _exporter(root)
    export()
    export()


def test_kill_during_export_never_leaves_a_missing_or_partial_bundle(tiny):
    """A kill just before each file-system step of two exports, and at timed points of exports in a loop, always
    leaves the complete bundle (byte for byte), and a reader looking meanwhile always finds one. On main, export
    deleted models/export before renaming the new one in: a kill between left no bundle (fails here)."""
    import multiprocessing

    from anomaly_core.deploy.engines import load_predictor
    from anomaly_core.deploy.export import remove_stale_temporaries

    ctx = multiprocessing.get_context("fork")
    root, rows, bundle = tiny
    want = _tree_digest(bundle)
    count = ctx.Value("i", 0)
    proc = _fork(_export_killed_at, root, 0, count)  # k=0: no kill, counts the steps
    proc.join(60)
    steps = count.value
    assert proc.exitcode == 0 and steps >= 6
    for k in range(1, steps + 1):
        proc = _fork(_export_killed_at, root, k, ctx.Value("i", 0))
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL
        assert _tree_digest(bundle) == want, f"killed before step {k} of {steps}: not the complete bundle"
    start = time.perf_counter()
    _exporter(root)()
    once = time.perf_counter() - start  # one export's duration
    for frac in (0.3, 1.1, 2.2):
        ready = ctx.Event()
        proc = _fork(_export_forever, root, ready)
        assert ready.wait(30)
        before = (bundle / "model.json").stat().st_mtime_ns
        until, missing, polls = time.perf_counter() + frac * once, 0, 0
        while time.perf_counter() < until:  # meanwhile a reader always finds a bundle
            missing += not (bundle / "model.json").is_file()
            polls += 1
            time.sleep(0.0002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert missing == 0, f"no bundle in {missing} of {polls} looks while exporting"
        if frac > 1.5:
            assert (bundle / "model.json").stat().st_mtime_ns != before  # the child did export meanwhile
        assert _tree_digest(bundle) == want, f"kill {frac:.2f} export-times in: the bundle is not the complete one"
    load_predictor(bundle)  # a loadable bundle
    remove_stale_temporaries(bundle)  # a killed export's temporaries go with the next export
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["export"]


def test_bundle_swap_replaces_every_file_and_outputs_are_group_readable(tiny, tmp_path):
    """On main every output is created 0600 (mkstemp)."""
    from anomaly_core.io import replace_dir, write_json

    root, rows, bundle = tiny
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        dest, new = tmp_path / "dest", tmp_path / "new"
        (dest / "sub").mkdir(parents=True)
        (dest / "sub" / "stale.txt").write_text("old")
        new.mkdir()
        (new / "fresh.txt").write_text("new")
        replace_dir(new, dest)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in dest.rglob("*")) == ["fresh.txt"] and not new.exists()
    modes = {stat.S_IMODE(p.stat().st_mode) for p in bundle.rglob("*") if p.is_file()}
    assert modes == {0o644 & ~old}, modes  # the bundle's weights, banks and card


def _cli(*args) -> None:
    """The real CLI in this (forked) process (one torch thread, as a DataLoader worker: the parent's OpenMP pool
    does not survive a fork)."""
    import torch

    torch.set_num_threads(1)
    res = CliRunner().invoke(app, [str(a) for a in args])
    os._exit(res.exit_code)


def _images(rows, root: Path) -> list[str]:
    cat = sorted({r.category for r in rows})[0]
    return cat, [str(root / r.image) if not Path(r.image).is_absolute() else r.image
                 for r in rows if r.category == cat and r.split in ("val", "test")]


def _edited_bundle(bundle: Path, tmp_path: Path, edit) -> tuple[Path, dict]:
    """A copy of `bundle` whose model.json was changed in place by `edit(card)`: (the copy, the edited card)."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    card = json.loads((copy / "model.json").read_text())
    edit(card)
    (copy / "model.json").write_text(json.dumps(card))  # json writes NaN as NaN
    return copy, card


def test_kill_during_predict_then_resume_gives_the_uninterrupted_csv(tiny, tmp_path, monkeypatch):
    """On main predict writes predictions.csv once at the end (a kill loses every row) and has no --resume."""
    import torch

    monkeypatch.setenv("ANOMALY_CORE_PROGRESS", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference run scores with one thread as the forked runs do
    try:
        _kill_predict_resume(tiny, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_predict_resume(tiny, tmp_path) -> None:
    root, rows, bundle = tiny
    cat, images = _images(rows, root)
    args = ["predict", bundle, *images, "--category", cat, "--batch-size", "2", "--heatmaps"]
    ref = CliRunner().invoke(app, [str(a) for a in args] + ["--out", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    want = (tmp_path / "ref" / "predictions.csv").read_text()
    assert len(want.splitlines()) == len(images) + 1
    for n, kill_at in enumerate((0, 1, 4, 7)):  # lines in the CSV (header included) when the kill comes
        out = tmp_path / f"o{n}"
        proc = _fork(_cli, *args, "--out", out)
        csv_path = out / "predictions.csv"
        deadline = time.time() + 60
        while kill_at and time.time() < deadline and proc.is_alive():
            if csv_path.is_file() and csv_path.read_bytes().count(b"\n") >= kill_at:
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        partial = csv_path.read_text() if csv_path.is_file() else ""
        assert partial.count("\n") >= kill_at and want.startswith(partial[: partial.rfind("\n") + 1])
        res = CliRunner().invoke(app, [str(a) for a in args] + ["--out", str(out), "--resume"])
        assert res.exit_code == 0, res.output
        assert csv_path.read_text() == want, f"killed at {kill_at} CSV lines"
        assert sorted(p.name for p in (out / "heatmaps").iterdir()) == \
            sorted(p.name for p in (tmp_path / "ref" / "heatmaps").iterdir())


def test_fresh_predict_removes_older_outputs_and_resume_refuses_another_category(tiny, tmp_path):
    root, rows, bundle = tiny
    cat, images = _images(rows, root)
    out = tmp_path / "out"
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / "99999_old.png").write_bytes(b"old")
    (out / "predictions.csv").write_text("path,category,score,is_anomalous,threshold,error\nold.png,x,1,1,0.5,\n")
    res = CliRunner().invoke(app, ["predict", str(bundle), images[0], "--out", str(out), "--category", cat])
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(open(out / "predictions.csv")))
    assert [t["path"] for t in table] == [images[0]] and not (out / "heatmaps").exists()
    (out / "predictions.csv").write_text("path,category,score,is_anomalous,threshold,error\nold.png,x,1,1,0.5,\n")
    res = CliRunner().invoke(app, ["predict", str(bundle), images[0], "--out", str(out), "--category", cat,
                                   "--resume"])
    assert res.exit_code == 2 and "written for category x" in res.output and len(res.output.splitlines()) == 1


@pytest.mark.parametrize("value", [None, float("nan"), "missing"])
def test_predict_refuses_a_missing_or_nan_threshold(tiny, tmp_path, value):
    """On main a missing threshold became NaN and `s >= nan` reported every image normal, exit 0."""
    root, rows, bundle = tiny
    cat, images = _images(rows, root)

    def edit(card):
        if value == "missing":
            del card["thresholds"][cat]
        else:
            card["thresholds"][cat]["image"] = value

    copy, _ = _edited_bundle(bundle, tmp_path, edit)
    res = CliRunner().invoke(app, ["predict", str(copy), images[0], "--out", str(tmp_path / "o"), "--category", cat])
    assert res.exit_code == 2 and f"thresholds.{cat}.image" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o" / "predictions.csv").exists()


@pytest.mark.parametrize("size", ["0", "-1"])
def test_predict_refuses_a_batch_size_below_one(tiny, tmp_path, size):
    """On main -1 wrote an empty CSV with exit 0 and 0 raised a traceback."""
    root, rows, bundle = tiny
    cat, images = _images(rows, root)
    res = CliRunner().invoke(app, ["predict", str(bundle), images[0], "--out", str(tmp_path), "--category", cat,
                                   "--batch-size", size])
    assert res.exit_code == 2 and res.output.strip() == f"error: --batch-size {size}: must be >= 1"


def test_collect_refuses_an_output_inside_a_dvc_output(tmp_path):
    """On main the default --out reports/sweep lies inside evaluate's output `reports` (dvc repro deletes it)."""
    from anomaly_core.experiments import dvc_output_containing

    fixture = REPO / "tests" / "fixtures" / "dvc_exp_show.json"
    assert dvc_output_containing(REPO, REPO / "reports" / "sweep") == ("evaluate", "reports")
    assert dvc_output_containing(REPO, REPO / "sweeps") is None
    res = CliRunner().invoke(app, ["collect", "--repo", str(REPO), "--from-json", str(fixture),
                                   "--out", str(REPO / "reports" / "sweep")])
    assert res.exit_code == 2 and "output of DVC stage evaluate" in res.output
    res = CliRunner().invoke(app, ["collect", "--repo", str(REPO), "--from-json", str(fixture),
                                   "--out", str(tmp_path / "s")])
    assert res.exit_code == 0 and (tmp_path / "s" / "experiments.csv").is_file()


def test_predict_caps_a_transductive_pool_with_a_memory_estimate(tiny, tmp_path):
    """On main a MuSc bundle put every input in one pool (n x P x n floats) with no cap."""
    from anomaly_core.deploy.predict import pool_memory_bytes

    root, rows, bundle = tiny
    cat, images = _images(rows, root)
    # transductive: refused before any model is loaded
    copy, card = _edited_bundle(bundle, tmp_path, lambda card: card.update(transductive=True))
    res = CliRunner().invoke(app, ["predict", str(copy), *images[:3], "--out", str(tmp_path / "o"), "--category", cat,
                                   "--pool-size", "2"])
    gb = pool_memory_bytes(card, 3) / 1e9
    assert res.exit_code == 2 and "above --pool-size 2" in res.output and f"about {gb:.1f} GB" in res.output
    entry = card["backbone"]["visual"]
    grid = entry.get("grid") or entry["image_size"] // 8  # the backbone's patch grid (a CNN: stride 8)
    assert pool_memory_bytes(card, 3000) == 3000 * 3000 * grid * grid * 4


@pytest.mark.parametrize("edit", ["weights", "category", "absolute"])
def test_a_crafted_card_cannot_name_files_outside_its_bundle(tiny, tmp_path, edit):
    """On main a card's `weights`, member `dir` and category names were joined into paths unchecked."""
    root, rows, bundle = tiny
    cat, images = _images(rows, root)

    def craft(card):
        if edit == "weights":
            card["backbone"]["visual"]["weights"] = "../../outside.safetensors"
        elif edit == "absolute":
            card["backbone"]["visual"]["weights"] = str(bundle / "backbone_visual.safetensors")
        else:
            card["categories"].append("../../x")

    copy, _ = _edited_bundle(bundle, tmp_path, craft)
    res = CliRunner().invoke(app, ["predict", str(copy), images[0], "--out", str(tmp_path / "o"), "--category", cat])
    assert res.exit_code == 2 and "refusing the bundle" in res.output and len(res.output.strip().splitlines()) == 1


def test_predict_refuses_formats_the_datasets_do_not_use(tiny, tmp_path):
    """On main any format PIL knows (GIF, WebP, ...) was scored."""
    from PIL import Image

    root, rows, bundle = tiny
    cat, images = _images(rows, root)
    gif = tmp_path / "a.gif"
    Image.open(images[0]).convert("RGB").save(gif)
    res = CliRunner().invoke(app, ["predict", str(bundle), str(gif), images[0], "--out", str(tmp_path / "o"),
                                   "--category", cat])
    table = list(csv.DictReader(open(tmp_path / "o" / "predictions.csv")))
    assert "unsupported image format .gif" in table[0]["error"] and table[0]["score"] == ""
    assert table[1]["error"] == "" and float(table[1]["score"]) > 0 and res.exit_code == 0
