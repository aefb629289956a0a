"""The `fingerprint` stage (issue 17): content hashes of the files params name, byte-identical while the files are,
cheap when nothing changed (stat cache), and sensitive to an in-place replacement that keeps the old mtime."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_mvtec_tree, make_visa_tree, with_changes
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def run_stage(tmp: Path, capsys, **changes) -> dict[str, bytes]:
    """validate + fingerprint as DVC runs them; {output file name: bytes}."""
    from stages import fingerprint, validate

    (tmp / "params.yaml").write_text(yaml.safe_dump(with_changes(PARAMS, changes)))
    validate.main(params_file=tmp / "params.yaml", out=tmp / "config")
    capsys.readouterr()
    fingerprint.main(config=tmp / "config" / "fingerprint.json", out=tmp / "fp", stat_cache=tmp / "stat_cache.json")
    return {p.name: p.read_bytes() for p in sorted((tmp / "fp").glob("*.json"))}


def last_line(capsys) -> str:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("fingerprint:")][-1]


def replace_in_place(path: Path, pixels: np.ndarray) -> None:
    """New pixels at the same path with the old mtime restored (as `cp -p` would)."""
    st = path.stat()
    Image.fromarray(pixels).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_mvtec_tree_fingerprint_is_stable_cheap_and_sees_one_replaced_image(tmp_path: Path, capsys):
    tree = make_mvtec_tree(tmp_path / "mvtec")
    changes = {"methods": ["knn"], "data.format": "mvtec", "data.root": str(tree)}
    first = run_stage(tmp_path, capsys, **changes)
    n_files = sum(1 for p in tree.rglob("*") if p.is_file())
    line = last_line(capsys)
    assert f"{n_files + 1} files, {n_files + 1} read in full, 0 changed" in line, line  # + the package weights
    dataset = json.loads(first["dataset.json"])
    assert sorted(dataset["categories"]) == ["alpha", "beta"] and dataset["root"] == str(tree)
    assert sum(c["files"] for c in dataset["categories"].values()) == n_files  # every image and mask
    assert json.loads(first["weights_clip.json"]) == {"schema": 1, "used": False}  # methods [knn]: no CLIP

    again = run_stage(tmp_path, capsys, **changes)
    assert again == first  # byte-identical: nothing downstream re-runs
    assert f"{n_files + 1} files, 0 read in full, 0 changed" in last_line(capsys)

    image = tree / "alpha" / "train" / "good" / "000.png"
    replace_in_place(image, 255 - np.asarray(Image.open(image)))
    after = run_stage(tmp_path, capsys, **changes)
    line = last_line(capsys)
    assert "1 read in full, 1 changed since the last run" in line, line
    new = json.loads(after["dataset.json"])
    assert new["categories"]["alpha"]["sha256"] != dataset["categories"]["alpha"]["sha256"]
    assert new["categories"]["beta"] == dataset["categories"]["beta"]
    assert {k: v for k, v in after.items() if k != "dataset.json"} == {k: v for k, v in first.items()
                                                                       if k != "dataset.json"}


def test_weights_file_and_train_data_root_are_fingerprinted(tmp_path: Path, capsys):
    import timm

    weights = tmp_path / "w" / "lite0.pt"
    weights.parent.mkdir()
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), weights)
    visa = make_visa_tree(tmp_path / "visa", n_normal=6, n_anomaly=2)
    changes = {"backbones.visual.pretrained": str(weights), "aaclip.train_data.format": "visa",
               "aaclip.train_data.root": str(visa)}
    first = run_stage(tmp_path, capsys, **changes)
    w = json.loads(first["weights_visual.json"])
    assert w["pretrained"] == str(weights) and w["file"]["bytes"] == weights.stat().st_size
    train = json.loads(first["train_data.json"])
    assert sorted(train["categories"]) == ["candle", "pcb1"] and train["extra"]["files"] == 1  # + split_csv/1cls.csv
    assert json.loads(first["dataset.json"])["format"] == "demo"  # the demo's data is the demo_data stage's output

    state = torch.load(weights)
    state["conv_stem.weight"] += 1.0
    torch.save(state, weights)
    after = run_stage(tmp_path, capsys, **changes)
    assert json.loads(after["weights_visual.json"])["file"]["sha256"] != w["file"]["sha256"]
    assert after["train_data.json"] == first["train_data.json"] and after["dataset.json"] == first["dataset.json"]
    assert after["weights_clip.json"] == first["weights_clip.json"]


def test_unreadable_root_is_recorded_for_prepare_to_report(tmp_path: Path, capsys):
    out = run_stage(tmp_path, capsys, **{"data.format": "mvtec", "data.root": str(tmp_path / "nowhere")})
    record = json.loads(out["dataset.json"])
    assert record["unreadable"].startswith(f"data.root={tmp_path / 'nowhere'}: directory not found")


def test_same_size_rewrite_with_the_old_mtime_is_seen(tmp_path: Path, capsys):
    """Only the ctime differs (same size, mtime restored): the file is read again and its new hash recorded."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(bytes(range(256)) * 64)
    changes = {"backbones.visual.pretrained": str(weights)}
    first = json.loads(run_stage(tmp_path, capsys, **changes)["weights_visual.json"])
    st = weights.stat()
    weights.write_bytes(bytes(reversed(range(256))) * 64)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    after = json.loads(run_stage(tmp_path, capsys, **changes)["weights_visual.json"])
    assert "1 read in full, 1 changed since the last run" in last_line(capsys)
    assert after["file"]["bytes"] == first["file"]["bytes"] and after["file"]["sha256"] != first["file"]["sha256"]
