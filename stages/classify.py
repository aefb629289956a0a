"""DVC stage `classify`: the few-shot classification task (defect types incl. good, or ImageFolder classes).

Branches: CLIP zero-shot and CLIP image prototypes (when CLIP features were extracted) and a CNN linear probe
(when visual features were); temperatures, alpha and the stacker chosen on val, metrics on test.
"""
from pathlib import Path

import numpy as np
import torch
import typer

from anomaly_core.backbones import backbone_from_config
from anomaly_core.classification import ClassificationConfig, class_prompts, class_splits, run_classification
from anomaly_core.config import build
from anomaly_core.data import manifest as mf
from anomaly_core.evaluation import protocol_note, rounded
from anomaly_core.io import write_json
from anomaly_core.store import FeatureStore
from stages.common import friendly_errors, get, load_config, run

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(classes: Path = typer.Option(Path("data/prepared/classification.csv")),
         config: Path = typer.Option(Path("data/config/classify.json")),
         features: Path = typer.Option(Path("data/features")),
         metrics: Path = typer.Option(Path("metrics"))) -> None:
    params = load_config(config)
    cfg = build(ClassificationConfig, get(params, "classification"), "classification")
    seed = int(get(params, "seed"))
    store, rows = FeatureStore(features), mf.read_manifest(classes)
    names, splits = class_splits(store, rows)
    text = None
    if store.has("clip"):
        _, clip = backbone_from_config(get(params, "backbones.clip"), "backbones.clip")
        with torch.no_grad():
            text = clip.text_anchors([class_prompts(n.replace("/", " ")) for n in names]).numpy()
    report, details = run_classification(splits["train"], splits["val"], splits["test"], len(names), cfg, text, seed)
    untrained = [b for b, v in store.info.items() if v["untrained"]]
    out = {m: rounded(v) for m, v in report.items()}
    out["_protocol"] = {**protocol_note(float(get(params, "data.val_fraction")), untrained),
                        "classes": len(names), "shots_per_class": int(min(np.bincount(splits["train"].labels))),
                        "branches": sorted(store.info)}
    write_json(metrics / "classification.json", out)
    write_json(metrics / "classification_details.json", details)
    typer.echo("classification (test): " + ", ".join(f"{m} top1={v['top1']:.3f}" for m, v in report.items()))


if __name__ == "__main__":
    run(app)
