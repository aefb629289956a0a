"""DVC stage `train_prompts`: CoOp context vectors (method prompt_clip) and visual prompts (method vpt_knn)."""
from pathlib import Path

import typer

from anomaly_core.config import KnnConfig, build
from anomaly_core.data import manifest as mf
from anomaly_core.io import write_json
from anomaly_core.prompts.coop import CoopConfig, save_prompt_clip, train_prompt_clip
from anomaly_core.prompts.vpt import VptConfig, history_records, save_vpt, train_vpt
from anomaly_core.store import FeatureStore
from stages.common import clip_backbone, skip_unless_anomaly, friendly_errors, get, load_params, progress, seed_everything

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def main(manifest: Path = typer.Option(Path("data/prepared/manifest.csv")),
         features: Path = typer.Option(Path("data/features")),
         out: Path = typer.Option(Path("data/models/prompts")),
         history: Path = typer.Option(Path("metrics/prompt_history"))) -> None:
    params = load_params()
    if skip_unless_anomaly(params, dirs=(out, history)):
        return
    seed = int(get(params, "seed"))
    seed_everything(seed)
    size = int(get(params, "data.image_size"))
    rows, store = mf.read_manifest(manifest), FeatureStore(features)
    ccfg, clip = clip_backbone(params)
    coop_cfg = build(CoopConfig, {**get(params, "prompt_clip"), "seed": seed}, "prompt_clip")
    learners, coop_report = train_prompt_clip(store, rows, clip, coop_cfg, size, progress())
    for cat, learner in learners.items():
        save_prompt_clip(out / "prompt_clip" / f"{cat}.pt", learner, ccfg.name, coop_cfg)
    knn_cfg = build(KnnConfig, params.get("knn"), "knn")
    vpt_cfg = build(VptConfig, {**get(params, "vpt_knn"), "seed": seed}, "vpt_knn")
    models, vpt_report = train_vpt(store, rows, vpt_cfg, knn_cfg, progress())
    arch = store.info[knn_cfg.branch]["name"]
    for cat, model in models.items():
        save_vpt(out / "vpt_knn" / f"{cat}.pt", model, arch, vpt_cfg, history=vpt_report[cat])
        write_json(history / f"vpt_{cat}.json", history_records(vpt_report[cat]))
    write_json(history / "prompt_clip.json", coop_report)
    typer.echo(f"prompt_clip: {len(learners)} categories; vpt_knn: {len(models)} categories")


if __name__ == "__main__":
    app()
