"""The method interface: what a method is, and the context its fit and score receive.

A method is a package `anomaly_core/methods/<name>/` whose `__init__.py` defines `METHOD` (a `Method`), and one line
of the registry (`anomaly_core/methods/__init__.py`). Its config, maths, fit, score, curves and deploy pieces live
in that folder, over the method-free kit (`anomaly_core/kit/`). Stages, the validation, the fusion's candidates,
the evaluation order, deploy and the tests reach a method through the registry and this interface only; nothing
else lists method names or imports a method's modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from anomaly_core.config import build
from anomaly_core.data.manifest import Row
from anomaly_core.kit.scores import Scores
from anomaly_core.store import FeatureStore

Branch = Literal["visual", "clip"]


@dataclass
class Context:
    """What a method's `fit` and `score` get.

    `params` holds only the params.yaml keys the stage declared it reads (the method's section, `seed`,
    `data.image_size` and the method's `fit_reads` / `score_reads`), as written by the `validate` stage.
    """

    rows: list[Row]              # the manifest (train shots, val, test)
    store: FeatureStore          # cached frozen features
    cfg: Any                     # the method's typed config (its params section)
    params: dict[str, Any]       # the resolved params subset of this stage
    size: int                    # data.image_size: map and pixel-metric resolution
    seed: int
    models: Path                 # data/models/<method>: outputs of its dedicated training stages (AA-CLIP)
    progress: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _clip: Any = None

    def get(self, dotted: str) -> Any:
        """A resolved param, e.g. `knn.branch`; a key the stage did not declare is an error naming it."""
        from anomaly_core.config import section

        return section(self.params, dotted)

    def clip(self):
        """The frozen CLIP backbone of `backbones.clip` (built once)."""
        if self._clip is None:
            from anomaly_core.backbones import backbone_from_config

            self._clip = backbone_from_config(self.get("backbones.clip"), "backbones.clip", self.device)[1]
        return self._clip

    def arch(self, branch: Branch) -> str:
        """The backbone name of a cached feature branch (checkpoints record it)."""
        return self.store.info[branch]["name"]


@dataclass(frozen=True)
class Method:
    """One anomaly-detection method.

    * `section` / `config`: its params.yaml section and the dataclass built from it (`seed` is added when
      `seeded`).
    * `role`: the fusion branch it can stand for (`clip` or `visual`).
    * `branches(params)`: the cached feature branches it needs (from the validated full params).
    * `fit(ctx) -> ({category: state}, report)`: optional training on the train shots (and val anomalies); each
      state is written with `save(path, state, ctx)` to `<models>/state/<category>.pt` and read back with
      `load(path, ctx)`; the report goes to `metrics/fit/<name>.json`. Without `fit` the state is `{}`.
    * `score(ctx, states) -> {split: {category: (ids, image [N], maps [N, S, S])}}` for val and test.
    * `fit_reads` / `score_reads`: params keys they read besides `seed`, `data.image_size` (and, for score, the
      method's own section); the `validate` stage resolves them so DVC re-runs a stage exactly when something it
      reads changed.
    * `trained_by`: dedicated DVC stages that train it (AA-CLIP's two stages), which do no work when the method
      is not selected.
    * `holdout`: the params key of the share of val anomalies it never trains on (the fusion chooses on rows no
      method trained on).
    * `transductive`: it reads other test images when scoring one (said in `_protocol`).
    * `shot_features`: `score` reads the cached features of the train shots (kNN builds its memory bank from
      them at score time); an exported bundle then carries those features.
    * `curves(report) -> ({category: [per-epoch rows with "epoch"]}, summary)`: training curves of a fit report,
      logged with dvclive to `metrics/train/<name>/` (`dvc exp show`, `dvc plots`).
    * `sections`: further params sections the method owns, {section: (config class, seeded)} (AA-CLIP's `aaclip`
      and `aaclip_text`); `renamed`: old names of its section, refused with one line naming the new one.
    * `stages`: the module (imported on demand) holding the functions of its `trained_by` stages, one per stage
      name (`stage_function`).
    * `deploy`: the module (imported on demand) with its own bundle: `write_bundle(inputs, out, card) -> card`,
      `Predictor(bundle, card)` and optionally `onnx_graph(predictor, category)`. None: the generic bundle
      (`deploy/generic.py`: the method's own `score` on the new images).
    * `baseline`: the method it is compared with in `metrics/<name-prefix>_comparison.json` (VPT: plain kNN).
    * `unexportable(score params) -> reason`: why a bundle with these score-stage params would not score like the
      score stage ("" when it would); a non-empty reason makes export refuse (AA-CLIP's `aaclip.scoring: official`
      normalises scores over the scored set).
    * `tiles`: with `tiling.enabled` its score stage (and bundle) reads tiled visual features (`validate` adds the
      `tiling` section to its score config, and to its fit config when it trains: VPT-kNN); a selected method
      reading the visual branch without it is refused.
    """

    name: str
    section: str
    config: type
    role: Literal["visual", "clip"]
    score: Callable[[Context, dict[str, Any]], Scores]
    branches: Callable[[dict[str, Any]], tuple[Branch, ...]]
    fit: Callable[[Context], tuple[dict[str, Any], dict[str, Any]]] | None = None
    save: Callable[[Path, Any, Context], None] | None = None
    load: Callable[[Path, Context], Any] | None = None
    fit_reads: tuple[str, ...] = ()
    score_reads: tuple[str, ...] = ()
    trained_by: tuple[str, ...] = ()
    holdout: str | None = None
    transductive: bool = False
    shot_features: bool = False
    seeded: bool = False
    summary: str = ""
    curves: Callable[[dict[str, Any]], tuple[dict[str, list[dict]], dict[str, float]]] | None = None
    sections: dict[str, tuple[type, bool]] = field(default_factory=dict)
    renamed: tuple[str, ...] = ()
    stages: str | None = None
    deploy: str | None = None
    baseline: str | None = None
    tiles: bool = False  # scores tiled visual features (`tiling.enabled`); validate refuses tiling for the others
    unexportable: Callable[[dict[str, Any]], str] | None = None

    def stage_function(self, stage: str) -> Callable:
        """The function of one of its `trained_by` DVC stages (from the `stages` module)."""
        import importlib

        if stage not in self.trained_by or self.stages is None:
            raise KeyError(f"{self.name} has no stage {stage!r} (trained by: {', '.join(self.trained_by) or 'none'})")
        return getattr(importlib.import_module(self.stages), stage)

    def deploy_module(self):
        """Its deploy module (`write_bundle`, `Predictor`, optional `onnx_graph`), or None for the generic bundle."""
        import importlib

        return importlib.import_module(self.deploy) if self.deploy else None

    def build_config(self, params: dict[str, Any]) -> Any:
        """The typed config from the (resolved) params: section `self.section` (+ top-level `seed`)."""
        from anomaly_core.config import section

        raw = dict(section(params, self.section) or {})
        if self.seeded:
            raw["seed"] = int(section(params, "seed"))
        return build(self.config, raw, self.section)

    def reads(self, stage: Literal["fit", "score"]) -> tuple[str, ...]:
        """Params keys the method's fit / score stage reads (validated and resolved by `validate`): score reads
        its section and `score_reads`; fit reads exactly `fit_reads` (nothing when there is no fit)."""
        if stage == "fit":
            return ("seed", "data.image_size", *self.fit_reads) if self.fit is not None else ()
        return ("seed", "data.image_size", self.section, *self.score_reads)


def fixed_branches(*branches: Branch) -> Callable[[dict[str, Any]], tuple[Branch, ...]]:
    """`branches` for a method that always reads the same feature branches."""
    return lambda params: tuple(branches)


def branch_of(key: str) -> Callable[[dict[str, Any]], tuple[Branch, ...]]:
    """`branches` for a method whose branch is a param (e.g. `knn.branch`)."""
    from anomaly_core.config import section

    return lambda params: (section(params, key),)


def context_for(method: Method, params: dict[str, Any], rows: list[Row], store: FeatureStore, models: Path,
                progress: bool = False, device: torch.device | None = None) -> Context:
    """The Context of one fit / score stage. The typed config is built when the stage reads the method's section."""
    cfg = method.build_config(params) if method.section in params else None
    return Context(rows=rows, store=store, cfg=cfg, params=params, size=int(params["data"]["image_size"]),
                   seed=int(params["seed"]), models=Path(models), progress=progress,
                   device=device or torch.device("cpu"))


def states_path(models: Path, category: str) -> Path:
    """Where a fitted per-category state lives: data/models/<method>/state/<category>.pt."""
    return Path(models) / "state" / f"{category}.pt"
