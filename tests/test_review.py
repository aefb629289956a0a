"""The review page (`anomaly_core.review`, written by `evaluate`), the compare command (`anomaly-core review A B`,
on two folders and on two real `dvc exp` runs of a tiny pipeline) and the page in a real headless browser
(Debian's chromium; ANOMALY_CORE_BROWSER=0 skips those tests, otherwise a missing chromium fails them)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from anomaly_core import review
from anomaly_core.data import manifest as mf
from anomaly_core.deploy.thresholds import ThresholdConfig, category_thresholds
from anomaly_core.evaluation import masks_for
from anomaly_core.store import save_scores

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = os.environ.get("ANOMALY_CORE_CHROMIUM", "/usr/bin/chromium")
SIZE = 32

# scores per category: val (normals, anomalies) -> f1 threshold = the lowest val anomaly score; test rows chosen
# to give one FP and one FN in each category
VAL = {"good": [0.10, 0.20, 0.30], "defect": [0.80, 0.90]}
TEST = {"good": [0.15, 0.85, 0.25], "defect": [0.95, 0.50]}  # good #1 is a FP, defect #1 a FN (threshold 0.8)


def _dataset(root: Path, cats=("alpha", "beta")) -> list[mf.Row]:
    """PNG images (and masks for defects) under root; manifest rows: 2 train shots, val and test as VAL / TEST."""
    rng = np.random.default_rng(0)
    rows = []
    for c in cats:
        for split, n_good, n_def in (("train", 2, 0), ("val", 3, 2), ("test", 3, 2)):
            for i in range(n_good + n_def):
                label = int(i >= n_good)
                name = f"{split}_{i}"
                img = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
                path = root / c / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
                mask = ""
                if label:
                    m = np.zeros((SIZE, SIZE), np.uint8)
                    m[8:16, 8:16] = 255
                    mask = str(root / c / f"{name}_mask.png")
                    Image.fromarray(m).save(mask)
                rows.append(mf.Row(f"{c}/{split}/{'defect' if label else 'good'}/{name}", c, split, label,
                                   "defect" if label else "good", str(path), mask, int(split == "train")))
    return rows


def _scores(rows, root: Path, method: str, shift: dict | None = None) -> Path:
    """A method's val / test score files from VAL / TEST (+ `shift` {row id: new score}); maps = score on the
    mask region (anomalies) or a weak blob."""
    shift = shift or {}
    out = root / method
    for split, table in (("val", VAL), ("test", TEST)):
        per = {}
        for c in mf.categories(rows):
            part = mf.rows_for(rows, c, split)
            scores = [shift.get(r.id, table["defect" if r.label else "good"][
                sum(q.label == r.label for q in part[:k])]) for k, r in enumerate(part)]
            maps = torch.zeros(len(part), SIZE, SIZE)
            for k, s in enumerate(scores):
                maps[k, 8:16, 8:16] = s
            per[c] = ([r.id for r in part], torch.tensor(scores), maps)
        save_scores(out / f"{split}.safetensors", per)
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A review page of two methods (knn as VAL / TEST, musc with one FN fixed) and its rows."""
    root = tmp_path_factory.mktemp("review")
    rows = _dataset(root / "data")
    dirs = {"knn": _scores(rows, root / "scores", "knn"),
            "musc": _scores(rows, root / "scores", "musc", {"alpha/test/defect/test_4": 0.99})}
    reports = root / "reports"
    reports.mkdir()
    Image.new("RGB", (40, 30), "white").save(reports / "roc.png")
    Image.new("RGB", (40, 30), "white").save(reports / "pr.png")
    per_category = {m: {c: {"image_auroc": 0.5, "pixel_auroc": 0.75} for c in ("alpha", "beta")} for m in dirs}
    verdicts = review.write_review(rows, dirs, SIZE, ThresholdConfig(mode="f1"), 0, {}, per_category, reports)
    return {"root": root, "rows": rows, "dirs": dirs, "reports": reports, "verdicts": verdicts,
            "out": reports / "review"}


def test_thresholds_equal_the_export_rule_on_the_val_rows(page):
    rows = page["rows"]
    for c in ("alpha", "beta"):
        val = mf.rows_for(rows, c, "val")
        expected = category_thresholds(np.array([r.label for r in val]), np.array(VAL["good"] + VAL["defect"]),
                                       masks_for(val, SIZE), np.zeros((5, SIZE, SIZE)), ThresholdConfig(), c, True)
        assert page["verdicts"]["methods"]["knn"][c]["threshold"] == pytest.approx(expected["image"], abs=1e-7)
        assert expected["image"] == pytest.approx(0.8, abs=1e-6)


def test_verdicts_mark_false_positives_and_negatives(page):
    knn = page["verdicts"]["methods"]["knn"]["alpha"]
    marks = {i["id"]: i["mark"] for i in knn["images"]}
    assert marks == {"alpha/test/good/test_0": "tn", "alpha/test/good/test_1": "fp", "alpha/test/good/test_2": "tn",
                     "alpha/test/defect/test_3": "tp", "alpha/test/defect/test_4": "fn"}
    assert knn["counts"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 2}
    musc = page["verdicts"]["methods"]["musc"]["alpha"]
    assert musc["counts"] == {"tp": 2, "fp": 1, "fn": 0, "tn": 2}
    saved = json.loads((page["out"] / "verdicts.json").read_text())
    assert saved["methods"]["knn"]["beta"]["counts"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 2}


def test_page_files_are_beside_it_and_the_html_has_marks_and_threshold(page):
    out, v = page["out"], page["verdicts"]
    for m in ("knn", "musc"):
        for item in v["methods"][m]["alpha"]["images"]:
            assert Image.open(out / item["thumb"]).size == (review.THUMB, review.THUMB)
            assert Image.open(out / item["heat"]).size == (SIZE, SIZE)
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    assert html.count('class="threshold"') == 4 and html.count('class="threshold-line"') == 4
    assert html.count('<b class="mark">FP</b>') == 4 and html.count('<b class="mark">FN</b>') == 3  # knn 2, musc 1 (beta)
    # the threshold sits between the last image below it and the first at / above it (knn alpha: 0.50 | 0.85)
    strip = re.search(r'<div class="strip" data-method="knn">.*?</div></div>', html).group(0)
    scores = [float(s) for s in re.findall(r"<figcaption>([0-9.]+)</figcaption>", strip.split('class="threshold"')[0])]
    assert scores == [0.15, 0.25, 0.5]
    assert (out / "roc.png").is_file() and (out / "pr.png").is_file()
    # the heatmap of a defect carries the ground-truth contour (lime) on the mask border
    heat = np.asarray(Image.open(out / v["methods"]["knn"]["alpha"]["images"][3]["heat"]))
    assert heat[8, 12, 1] > 180 and heat[8, 12, 0] < 120


def test_a_dataset_without_masks_gets_overlays_without_contours(page, tmp_path):
    from dataclasses import replace

    rows = [replace(r, mask="") for r in page["rows"]]
    v = review.write_review(rows, {"knn": page["dirs"]["knn"]}, SIZE, ThresholdConfig(), 0, {}, {}, page["reports"],
                            out=tmp_path / "nomask")
    assert v["methods"]["knn"]["alpha"]["counts"] == page["verdicts"]["methods"]["knn"]["alpha"]["counts"]
    heat = np.asarray(Image.open(tmp_path / "nomask" / v["methods"]["knn"]["alpha"]["images"][3]["heat"]))
    with_contour = np.asarray(Image.open(page["out"] / v["methods"]["knn"]["alpha"]["images"][3]["heat"]))
    assert np.abs(heat.astype(int) - with_contour.astype(int)).max() > 100  # the lime border is gone


def test_review_is_rebuilt_whole(page, tmp_path):
    stale = page["out"] / "img" / "stale.jpg"
    stale.write_bytes(b"x")
    killed = page["reports"] / "review.tmp-999999999"  # a temporary of a process that is gone
    (killed / "img").mkdir(parents=True)
    review.write_review(page["rows"], page["dirs"], SIZE, ThresholdConfig(), 0, {}, {}, page["reports"])
    assert not stale.exists() and (page["out"] / "index.html").is_file() and not killed.exists()
    assert not list(page["reports"].glob("review.tmp-*"))


def test_compare_two_folders_through_the_cli(page, tmp_path):
    from anomaly_core.cli import app

    other = tmp_path / "b"
    dirs = {"knn": _scores(page["rows"], tmp_path / "scores", "knn",
                           {"alpha/test/defect/test_4": 0.99, "beta/test/good/test_0": 0.97})}
    review.write_review(page["rows"], dirs, SIZE, ThresholdConfig(), 0, {}, {}, page["reports"], out=other)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["review", str(page["out"]), str(other), "--out", str(out)])
    assert res.exit_code == 0, res.output
    diff = json.loads((out / "compare.json").read_text())
    assert [d["id"] for d in diff["methods"]["knn"]["alpha"]["differ"]] == ["alpha/test/defect/test_4"]
    assert [d["id"] for d in diff["methods"]["knn"]["beta"]["differ"]] == ["beta/test/good/test_0"]
    d = diff["methods"]["knn"]["alpha"]["differ"][0]
    assert (d["a"]["mark"], d["b"]["mark"]) == ("fn", "tp") and (out / d["img"]).is_file()
    assert diff["only_a"] == ["musc"] and diff["methods"]["knn"]["alpha"]["errors"] == [2, 1]
    html = (out / "index.html").read_text()
    assert "1 of 5 verdicts differ" in html and "2 verdicts differ" not in html
    assert "knn: 2 of 10 verdicts differ" in res.output


def test_compare_refuses_a_source_without_verdicts(tmp_path):
    from anomaly_core.cli import app

    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["review", str(tmp_path / "empty"), str(tmp_path / "empty"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "empty: a folder without verdicts.json" in lines[0]


# ------------------------------------------------------------------------------ two real `dvc exp` runs


def _run(cmd, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_compare_two_dvc_experiments(page, tmp_path):
    """A one-stage DVC repo whose stage copies one of two prepared review folders to reports/review (param
    `which`); two `dvc exp run`s; `anomaly-core review EXP_A EXP_B` reads both from the local DVC cache."""
    if not (BIN / "dvc").is_file():
        pytest.fail(f"dvc is not installed next to {sys.executable}")
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    shutil.copytree(page["out"], repo / "src" / "a")
    dirs = {"knn": _scores(page["rows"], tmp_path / "scores", "knn", {"beta/test/defect/test_4": 0.93})}
    review.write_review(page["rows"], dirs, SIZE, ThresholdConfig(), 0, {}, {}, page["reports"],
                        out=repo / "src" / "b")
    (repo / "params.yaml").write_text("which: a\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  review:\n    cmd: rm -rf reports && mkdir reports && cp -r src/${which} reports/review\n"
        "    deps: [src]\n    params: [which]\n    outs: [reports]\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _run(cmd, repo)
    _run(["dvc", "exp", "run", "-n", "exp-a", "-S", "which=a"], repo)
    _run(["dvc", "exp", "run", "-n", "exp-b", "-S", "which=b"], repo)
    shutil.rmtree(repo / "reports")  # the workspace copy is not what is read
    _run([str(BIN / "anomaly-core"), "review", "exp-a", "exp-b", "--out", str(tmp_path / "cmp")], repo)
    diff = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [d["id"] for p in diff["methods"]["knn"].values() for d in p["differ"]] == ["beta/test/defect/test_4"]
    assert diff["a"].startswith("exp-a (") and diff["only_a"] == ["musc"]
    d = diff["methods"]["knn"]["beta"]["differ"][0]
    assert (tmp_path / "cmp" / d["img"]).read_bytes() == (page["out"] / d["thumb"]).read_bytes()
    proc = subprocess.run([str(BIN / "anomaly-core"), "review", "exp-a", "no-such-exp", "--out", str(tmp_path / "x")],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no-such-exp: cannot read reports/review/verdicts.json" in proc.stderr


# ------------------------------------------------------------------------------ a real browser


def _chromium() -> str:
    if os.environ.get("ANOMALY_CORE_BROWSER") == "0":
        pytest.skip("ANOMALY_CORE_BROWSER=0")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: install Debian's chromium (apt-get install -y chromium chromium-driver; "
                    ".ci/run does) or set ANOMALY_CORE_BROWSER=0 to skip the browser tests")
    return CHROMIUM


def browser(page_file: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless chromium on a file:// page (no network, no profile outside tmp)."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           "--virtual-time-budget=5000", *args, page_file.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def test_page_in_headless_chromium(page, tmp_path):
    dom = browser(page["out"] / "index.html", tmp_path, "--dump-dom").stdout
    n_img = 2 * 2 * 5 + 2  # thumbnails (methods x categories x test images) + the two curves
    assert f'data-images="{n_img}"' in dom and f'data-images-loaded="{n_img}"' in dom, dom[-3000:]
    assert len(re.findall(r'<div class="threshold"', dom)) == 4
    assert len(re.findall(r'class="threshold-line"', dom)) == 4
    assert len(re.findall(r'<figure class="tile fp"', dom)) == 4 and len(re.findall(r'<figure class="tile fn"', dom)) == 3
    assert len(re.findall(r'data-heat="heat/knn/alpha/\d{4}\.jpg"', dom)) == 5


def test_compare_page_in_headless_chromium(page, tmp_path):
    other = tmp_path / "b"
    dirs = {"knn": _scores(page["rows"], tmp_path / "scores", "knn", {"alpha/test/defect/test_4": 0.99})}
    review.write_review(page["rows"], dirs, SIZE, ThresholdConfig(), 0, {}, {}, page["reports"], out=other)
    review.write_compare(review.load_verdicts(str(page["out"])), review.load_verdicts(str(other)), tmp_path / "cmp")
    dom = browser(tmp_path / "cmp" / "index.html", tmp_path, "--dump-dom").stdout
    assert 'data-images="1"' in dom and 'data-images-loaded="1"' in dom
    assert re.search(r'<figure class="tile diff tp" data-id="alpha/test/defect/test_4"', dom)
