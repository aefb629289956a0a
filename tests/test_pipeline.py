"""End-to-end tests: the real DVC pipeline (`dvc repro`) in a temporary copy of the repository.

Each module-scoped repo is built like a user would: copy `dvc.yaml`, `params.yaml`, `.dvcignore`,
`stages/` and `anomaly_core/`, `git init`, `dvc init`, commit, then `dvc repro`. Params are shrunk so a
full run takes about one minute on two CPU cores (tiny demo images, 1-3 epochs, two categories);
`backbones.clip.image_size` and `aaclip_image.image_size` stay 224 (the shipped tiny CLIP's native size),
only `data.image_size` (map / pixel-metric resolution) is reduced.

* demo dataset: full repro, every metrics file, then DVC's invalidation (a fusion param reruns only
  `fuse` and `evaluate`; a kNN param does not re-extract features), `dvc metrics/params diff`.
* MVTec-layout and VisA-layout trees (from the conftest builders) through the same pipeline, sharing one
  repo (switching `data.format` / `data.root` re-runs everything from `prepare`); a wrong `data.root` fails
  with one readable line; a forced `features` re-run must reproduce the same features (random CLIP weights are seeded).

The whole module takes about 4 minutes on a loaded 2-core machine.

Subprocess output (stdout + stderr, i.e. the stages' own messages) is shown when a command fails.
Set ANOMALY_CORE_E2E=0 to skip this module (it takes a few minutes).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MVTEC_CATEGORIES, VISA_OBJECTS, make_mvtec_tree, make_visa_tree

from anomaly_core.methods import method_names

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
REPRO_TIMEOUT = 1200  # seconds for one `dvc repro` (2 cores, possibly shared with other jobs)
CMD_TIMEOUT = 120

pytestmark = [
    pytest.mark.skipif(os.environ.get("ANOMALY_CORE_E2E") == "0", reason="ANOMALY_CORE_E2E=0"),
    pytest.mark.skipif(not DVC.is_file(), reason=f"dvc not installed next to {sys.executable}"),
]

METHODS = method_names()  # the registry: every method runs on the demo by default
STAGES = (["validate", "demo_data", "prepare", "features", "train_text_adapter", "train_image_adapter"]
          + [f"{kind}@{m}" for kind in ("fit", "score") for m in METHODS] + ["fuse", "classify", "evaluate", "export"])
DATASET_METHODS = ["aaclip", "zero_shot_clip", "knn", "musc"]  # the dataset trees test the readers; fewer methods
ANOMALY_METRICS = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_aupro", "pixel_ap"]
CLASS_METRICS = ["top1", "top5", "balanced_acc", "macro_f1"]
DEMO_CATEGORIES = ["brick", "washer"]

TINY: dict[str, Any] = {
    "data.image_size": 96,  # map / metric resolution only
    "data.categories": DEMO_CATEGORIES,
    "data.demo.n_train": 6,
    "data.demo.n_test_good": 4,
    "data.demo.n_test_defect_per_type": 2,
    "data.demo.size": 96,
    "aaclip_text.epochs": 1,
    "aaclip_image.epochs": 1,
    "multi_prototype.epochs": 3,
    "prompt_clip.epochs": 2,
    "vpt_knn.epochs": 3,
    "features.batch_size": 8,
    "evaluate.n_heatmaps": 1,
}

RUNNING = re.compile(r"^Running stage '([^']+)'", re.M)
CACHED = re.compile(r"^Stage '([^']+)' is cached", re.M)
FAILED = re.compile(r"failed to reproduce '([^']+)'")


# ----------------------------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANOMALY_CORE_PROGRESS"] = "0"
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # one intra-op thread per stage: on a small machine shared with other jobs, torch's default (one OpenMP
    # thread per core, spin-waiting) made the stages 2-3x slower (whole repro ~115s -> ~70s on 2 cores)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    # as a user runs it: Python writes __pycache__ next to the sources that are DVC dependencies
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPATH", None)
    return env


def _failure_text(cmd: list[str], proc_out: str, rc: int | str) -> str:
    """The command, its exit status and the output of the stage that failed (or the output's tail)."""
    lines = [f"`{' '.join(cmd)}` failed ({rc})"]
    failed = FAILED.findall(proc_out)
    if failed:
        start = proc_out.rfind(f"Running stage '{failed[-1]}'")
        lines.append(f"--- output of stage '{failed[-1]}' (its stdout and stderr) ---")
        lines.append(proc_out[start:] if start >= 0 else proc_out[-6000:])
    else:
        lines.append("--- output (tail) ---")
        lines.append(proc_out[-6000:])
    return "\n".join(lines)


class Repo:
    """A throw-away copy of the project with its own git + DVC repository."""

    def __init__(self, root: Path):
        self.root = root

    def run_rc(self, *cmd: str, timeout: float = CMD_TIMEOUT) -> tuple[int, str]:
        """Run `cmd` in the repo: (exit code, merged stdout+stderr); a timeout fails the test with the output."""
        try:
            proc = subprocess.run(list(cmd), cwd=self.root, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            pytest.fail(_failure_text(list(cmd), out, f"timeout after {timeout}s"), pytrace=False)
        return proc.returncode, proc.stdout

    def run(self, *cmd: str, timeout: float = CMD_TIMEOUT) -> str:
        """Run `cmd` in the repo; merged stdout+stderr; a failure fails the test showing the output."""
        rc, out = self.run_rc(*cmd, timeout=timeout)
        if rc != 0:
            pytest.fail(_failure_text(list(cmd), out, f"exit code {rc}"), pytrace=False)
        return out

    def dvc(self, *args: str, timeout: float = CMD_TIMEOUT) -> str:
        return self.run(str(DVC), *args, timeout=timeout)

    def repro(self, label: str) -> tuple[str, float]:
        """`dvc repro`; returns (output, wall seconds) and prints the timing."""
        t0 = time.perf_counter()
        out = self.dvc("repro", timeout=REPRO_TIMEOUT)
        dt = time.perf_counter() - t0
        print(f"\n[timing] dvc repro ({label}): {dt:.1f}s, ran {ran(out)}")
        return out, dt

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, overrides: dict[str, Any]) -> None:
        """Edit params.yaml like a user: load, set dotted keys, write back."""
        params = self.params()
        for dotted, value in overrides.items():
            node = params
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            assert leaf in node, f"unknown param {dotted}"
            node[leaf] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)

    def json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())

    def out_hash(self, stage: str, path: str) -> str:
        """md5 that dvc.lock records for output `path` of `stage`."""
        lock = yaml.safe_load((self.root / "dvc.lock").read_text())
        return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


ALWAYS = "fingerprint"  # always_changed (it looks at data.root / weights files): runs on every repro, same outputs


def ran(output: str) -> list[str]:
    """Stages whose command actually ran in a `dvc repro` output (but the always-run `fingerprint`)."""
    return [s for s in RUNNING.findall(output) if s != ALWAYS]


def touched(output: str) -> set[str]:
    """Stages that ran or were restored from DVC's run-cache (but the always-run `fingerprint`)."""
    return (set(RUNNING.findall(output)) | set(CACHED.findall(output))) - {ALWAYS}


def assert_up_to_date(repo: "Repo") -> None:
    """`dvc status` lists nothing but the always-changed `fingerprint` stage."""
    status = json.loads(repo.dvc("status", "--json"))
    assert status == {ALWAYS: ["always changed"]}, status


def make_repo(root: Path, overrides: dict[str, Any]) -> Repo:
    """Copy the project into `root`, apply the params overrides, git + dvc init and commit."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    root.mkdir(parents=True)
    for name in ("stages", "anomaly_core"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, root / name)
    repo = Repo(root)
    repo.run("git", "init", "-q")
    repo.run("git", "config", "user.email", "e2e@example.com")
    repo.run("git", "config", "user.name", "anomaly_core e2e")
    repo.dvc("init", "-q")
    repo.dvc("config", "core.analytics", "false")
    if (REPO / ".dvcignore").is_file():  # the project's ignore rules replace `dvc init`'s empty template
        shutil.copy2(REPO / ".dvcignore", root / ".dvcignore")
    repo.set_params(overrides)
    params = repo.params()
    assert params["backbones"]["clip"]["image_size"] == params["aaclip_image"]["image_size"] == 224
    repo.commit("e2e: project copy with tiny params")
    return repo


def check_anomaly_metrics(repo: Repo, categories: list[str], methods: list[str] = METHODS + ["fusion"]) -> dict:
    summary = repo.json("metrics/summary.json")
    assert "_protocol" in summary and summary["_protocol"]["reported_split"] == "test"
    for method in methods:
        assert method in summary, f"summary.json lacks {method}: {sorted(summary)}"
        for metric in ANOMALY_METRICS:
            value = summary[method].get(metric)
            assert isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"{method}.{metric} = {value!r}"
    per_cat = repo.json("metrics/per_category.json")
    for method in methods:
        assert sorted(per_cat[method]) == sorted(categories), (method, sorted(per_cat[method]))
        for cat in categories:
            for metric in ANOMALY_METRICS:
                assert 0.0 <= per_cat[method][cat][metric] <= 1.0, (method, cat, metric)
    return summary


# ----------------------------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory) -> Repo:
    """The demo pipeline reproduced once and committed (shared by the demo tests)."""
    repo = make_repo(tmp_path_factory.mktemp("e2e_demo") / "repo", TINY)
    out, _ = repo.repro("demo, from scratch")
    assert sorted(ran(out)) == sorted(STAGES), f"expected every stage to run once; ran {ran(out)}"
    repo.commit("e2e: first repro")
    return repo


def test_demo_repro_outputs(demo_repo: Repo):
    repo = demo_repo
    assert_up_to_date(repo)

    summary = check_anomaly_metrics(repo, DEMO_CATEGORIES)
    assert summary["_protocol"]["untrained_backbones"] == "clip"  # the shipped tiny CLIP is random
    assert list(summary)[:-2] == METHODS and list(summary)[-2:] == ["fusion", "_protocol"]  # registry order
    assert summary["_protocol"]["transductive"] == ["musc"]  # MuSc reads the other test images
    assert "musc" in repo.json("metrics/per_category.json")

    classification = repo.json("metrics/classification.json")
    assert "_protocol" in classification
    branches = [m for m in classification if not m.startswith("_")]
    assert {"cnn_linear", "chosen"} <= set(branches), branches
    for method in branches:
        for metric in CLASS_METRICS:
            value = classification[method][metric]
            assert 0.0 <= value <= 1.0, f"classification {method}.{metric} = {value}"

    fusion = repo.json("metrics/fusion.json")
    assert fusion["metric"] == "image_auroc" and 0.0 <= fusion["alpha"] <= 1.0

    heatmaps = sorted(p.name for p in (repo.root / "reports" / "heatmaps").glob("*.png"))
    assert heatmaps and all((repo.root / "reports" / "heatmaps" / h).stat().st_size > 0 for h in heatmaps)
    assert "knn_brick.png" in heatmaps and "fusion_washer.png" in heatmaps, heatmaps
    for name in ("report.md", "roc.png", "pr.png", "alpha_curve.png"):
        assert (repo.root / "reports" / name).is_file(), name
    for method in METHODS + ["fusion"]:
        assert (repo.root / "metrics" / "plots" / "roc" / f"{method}.json").is_file(), method
    # the review page: every method, and the exported method's thresholds are the bundle's (same rule, same rows)
    assert (repo.root / "reports" / "review" / "index.html").is_file()
    verdicts = repo.json("reports/review/verdicts.json")
    assert list(verdicts["methods"]) == METHODS + ["fusion"] and verdicts["categories"] == DEMO_CATEGORIES
    card = repo.json("models/export/model.json")
    for cat in DEMO_CATEGORIES:
        page_t = verdicts["methods"][card["method"]][cat]["threshold"]
        assert abs(page_t - card["thresholds"][cat]["image"]) <= 1e-9 * max(1.0, abs(page_t)), (cat, page_t)
    # dvclive training curves: final values in `dvc exp show` / `dvc metrics show`, per-epoch rows for the plots
    for name in ("aaclip_text", "aaclip_image", "prompt_clip", "vpt_knn", "multi_prototype"):
        assert (repo.root / "metrics" / "train" / name / "metrics.json").is_file(), name
        assert list((repo.root / "metrics" / "train" / name / "plots" / "metrics").rglob("*.tsv")), name

    shown = json.loads(repo.dvc("metrics", "show", "--json"))
    text = json.dumps(shown)
    assert "metrics/summary.json" in text and "metrics/classification.json" in text
    assert "metrics/train/aaclip_image/metrics.json" in text
    workspace = next(iter(shown.values()))["data"]
    assert workspace["metrics/summary.json"]["data"]["knn"]["image_auroc"] == summary["knn"]["image_auroc"]


def test_demo_fusion_param_reruns_only_fuse_and_evaluate(demo_repo: Repo):
    repo = demo_repo
    repo.set_params({"fusion.metric": "pixel_auroc"})
    out, _ = repo.repro("fusion.metric=pixel_auroc")
    # validate re-reads params.yaml; only fuse.json changed, so only fuse and evaluate run after it
    assert ran(out) == ["validate", "fuse", "evaluate", "export"], f"ran {ran(out)}\n{out[-3000:]}"
    assert touched(out) == {"validate", "fuse", "evaluate", "export"}
    assert repo.json("metrics/fusion.json")["metric"] == "pixel_auroc"
    check_anomaly_metrics(repo, DEMO_CATEGORIES)

    params_diff = json.loads(repo.dvc("params", "diff", "--json"))
    assert params_diff == {"params.yaml": {"fusion.metric": {"old": "image_auroc", "new": "pixel_auroc"}}}, params_diff
    metrics_diff = json.loads(repo.dvc("metrics", "diff", "--json"))
    assert "metrics/fusion.json" in metrics_diff, metrics_diff  # val scores now measured in pixel_auroc
    assert "fusion.json" in repo.dvc("metrics", "diff")  # the human-readable table too
    assert_up_to_date(repo)


def test_demo_knn_param_rescores_only_knn_methods(demo_repo: Repo):
    repo = demo_repo
    before = repo.json("metrics/per_category.json")["knn"]
    features_md5 = repo.out_hash("features", "data/features")
    aaclip_md5 = repo.out_hash("score@aaclip", "data/scores/aaclip")
    repo.set_params({"knn.k": 3})
    out, _ = repo.repro("knn.k=3")
    # VPT scores through the kNN branch (it reads `knn`); no other method, no training, no features re-run
    assert ran(out) == ["validate", "score@knn", "score@vpt_knn", "fuse", "evaluate", "export"], ran(out)
    after = repo.json("metrics/per_category.json")["knn"]
    assert sorted(after) == sorted(before) == DEMO_CATEGORIES
    assert repo.out_hash("features", "data/features") == features_md5
    assert repo.out_hash("score@aaclip", "data/scores/aaclip") == aaclip_md5
    check_anomaly_metrics(repo, DEMO_CATEGORIES)
    assert_up_to_date(repo)
    repo.commit("e2e: knn.k=3")


def test_demo_editing_one_methods_code_reruns_only_its_stages(demo_repo: Repo):
    """A comment in `anomaly_core/methods/vpt_knn/` re-runs fit@vpt_knn, score@vpt_knn and what reads their outputs
    (fuse, evaluate, export), and no other method's fit@ / score@ stage (each depends on its own folder + the kit).
    `validate` checks every method's config section, so it depends on every method folder and re-runs too; its
    output (data/config) is unchanged, so nothing re-runs because of it."""
    repo = demo_repo
    target = repo.root / "anomaly_core" / "methods" / "vpt_knn" / "vpt.py"
    target.write_text(target.read_text() + "\n# a comment: the code is the same\n")
    out, _ = repo.repro("comment in methods/vpt_knn")
    per_method = [s for s in ran(out) if s.startswith(("fit@", "score@"))]
    assert per_method == ["fit@vpt_knn", "score@vpt_knn"], ran(out)
    assert set(ran(out)) <= {"validate", "fit@vpt_knn", "score@vpt_knn", "fuse", "evaluate", "export"}, ran(out)
    assert_up_to_date(repo)
    repo.commit("e2e: comment in vpt_knn")


def test_demo_methods_knn_only_touches_no_clip(demo_repo: Repo):
    """`methods: [knn]`: no CLIP features, AA-CLIP's stages do no work, fusion says why it is skipped."""
    repo = demo_repo
    repo.set_params({"methods": ["knn"]})
    out, _ = repo.repro("methods=[knn]")
    steps = ran(out)
    assert not any(s.startswith(("fit@", "score@")) and not s.endswith("@knn") for s in steps), steps
    assert {"validate", "features", "score@knn", "fuse", "evaluate"} <= set(steps), steps
    assert "skipped: method aaclip not selected" in out
    assert "is empty" not in out, out  # skipped stages' declared plots dirs are not empty (quiet subset runs)
    assert list(repo.json("data/features/info.json")) == ["visual"]  # no CLIP model was built
    assert not (repo.root / "data" / "features" / "clip").exists()
    summary = check_anomaly_metrics(repo, DEMO_CATEGORIES, ["knn"])
    assert [m for m in summary if not m.startswith("_")] == ["knn"]
    assert "needs fusion.visual_method" in repo.json("metrics/fusion.json")["skipped"]
    assert repo.json("metrics/classification.json")["_protocol"]["branches"] == ["visual"]
    repo.commit("e2e: knn only")


# ----------------------------------------------------------------------------------------------- MVTec / VisA


@pytest.fixture(scope="module")
def dataset_repo(tmp_path_factory) -> Repo:
    """One repo shared by the MVTec and VisA runs (each switch re-runs the pipeline from `prepare`)."""
    return make_repo(tmp_path_factory.mktemp("e2e_datasets") / "repo", {**TINY, "methods": DATASET_METHODS})


@pytest.fixture(scope="module")
def dataset_trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("e2e_trees")
    # VisA: 5 anomalies per object, so the val carve (0.4) keeps 2 and AA-CLIP's holdout leaves one that no method
    # trained on for the choices (with 3, the val split has 1 and fuse stops on it, as it must)
    return {"mvtec": make_mvtec_tree(base / "mvtec"),
            "visa": make_visa_tree(base / "visa", n_normal=9, n_anomaly=5)}


def _run_dataset(repo: Repo, fmt: str, root: Path, categories: list[str]) -> None:
    repo.set_params({"data.format": fmt, "data.root": str(root), "data.categories": "all"})
    out, _ = repo.repro(f"{fmt} tree")
    assert {"prepare", "features", "score@knn", "fuse", "evaluate"} <= set(ran(out)), ran(out)
    manifest = (repo.root / "data" / "prepared" / "manifest.csv").read_text()
    assert str(root) in manifest  # images read from the dataset tree, not the demo
    summary = check_anomaly_metrics(repo, categories, DATASET_METHODS + ["fusion"])
    knn = summary["knn"]
    assert all(0.0 <= knn[m] <= 1.0 for m in ANOMALY_METRICS), knn
    assert_up_to_date(repo)
    repo.commit(f"e2e: {fmt}")


def test_missing_dataset_root_fails_readably(dataset_repo: Repo, tmp_path: Path):
    """A wrong `data.root` stops `prepare` with one friendly line, and the failure report shows it."""
    repo = dataset_repo
    missing = tmp_path / "no_such_dataset"
    repo.set_params({"data.format": "mvtec", "data.root": str(missing), "data.categories": "all"})
    rc, out = repo.run_rc(str(DVC), "repro", timeout=REPRO_TIMEOUT)
    assert rc != 0
    assert "failed to reproduce 'prepare'" in out, out[-3000:]
    assert f"error: prepare: data.root={missing}: directory not found" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    report = _failure_text(["dvc", "repro"], out, rc)  # what a failing e2e test would print
    assert report.count("Running stage 'prepare'") == 1 and "directory not found" in report, report


def test_mvtec_tree_pipeline(dataset_repo: Repo, dataset_trees: dict[str, Path]):
    """...with one defect image whose mask is all zero: a warning naming the file, in prepare's output and in
    every metrics file's `_protocol`; the run goes on."""
    import numpy as np
    from PIL import Image

    mask = dataset_trees["mvtec"] / "alpha" / "ground_truth" / "dark" / "000_mask.png"
    Image.fromarray(np.zeros(np.asarray(Image.open(mask)).shape, np.uint8)).save(mask)
    _run_dataset(dataset_repo, "mvtec", dataset_trees["mvtec"], list(MVTEC_CATEGORIES))
    warnings = dataset_repo.json("metrics/summary.json")["_protocol"]["input_warnings"]
    assert len(warnings) == 1 and "000_mask.png" in warnings[0] and "dark" in warnings[0], warnings


def test_visa_tree_pipeline(dataset_repo: Repo, dataset_trees: dict[str, Path]):
    _run_dataset(dataset_repo, "visa", dataset_trees["visa"], list(VISA_OBJECTS))


def test_forced_features_rerun_is_reproducible(dataset_repo: Repo):
    """`dvc repro -f features` on unchanged inputs must give byte-identical features (runs after the VisA test)."""
    repo = dataset_repo
    if not (repo.root / "dvc.lock").is_file():
        pytest.skip("needs a reproduced pipeline (run with the VisA test)")
    before = repo.out_hash("features", "data/features")
    repo.dvc("repro", "-f", "-s", "features", timeout=REPRO_TIMEOUT)
    assert repo.out_hash("features", "data/features") == before
