"""Few-shot image classification (task `classification`): CLIP and CNN branches, their fusion and a stacker.

Branches produce logits [N, C] (C classes, labels are ints in [0, C)):

- ``clip_zero_shot``: ``scale * cos(image embedding, class text embedding)`` (text = mean over ``class_prompts``);
- ``clip_prototypes``: ``cos(image embedding, class centroid of the k-shot train embeddings) / temperature``;
- ``cnn_linear``: a linear probe (StandardScaler + balanced LogisticRegression) on mean-pooled CNN features.

Protocol (nothing is chosen on test): one temperature per branch is fitted on val (``calibration``); the
CLIP branch of the alpha fusion, alpha, and the final ``chosen`` method are chosen on val. The stacker is a
logistic regression on the concatenated (temperature-scaled) branch probabilities, trained on the TRAINING
split: every training image's branch probabilities are out-of-fold (stratified k-fold: the linear probe and the
prototypes of a fold are fitted on the other folds; zero-shot needs no fitting), and the stacker is fitted on a
stratified ``train_test_split`` of those rows, the held-out rows giving an inner check. A stacker whose val score
is below its best single branch is flagged (``worse_than_best_single``) and never chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import torch

from anomaly_core.calibration import fit_temperature, softmax_t
from anomaly_core.config import Checks
from anomaly_core.errors import DataError
from anomaly_core.fusion import TIE_RULE, best_on_grid, with_endpoints
from anomaly_core.kit.prototypes import class_centroids

if TYPE_CHECKING:  # sklearn is imported where it is used: validate reads only this module's config
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import Pipeline

__all__ = [
    "TEMPLATES", "BRANCHES", "ClassificationConfig", "ClassSplit", "class_prompts", "average_templates",
    "clip_zero_shot_logits", "prototype_logits", "global_pool", "linear_probe",
    "predict_logits", "branch_logits", "fuse_probs", "alpha_fusion", "Stacker", "oof_logits", "stacker_split", "choose",
    "pick_method", "classification_report", "run_classification",
]

TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of the {}.",
    "a photo of the {}, a type of object.",
)
BRANCHES = ("clip_zero_shot", "clip_prototypes", "cnn_linear")
ClsMetric = Literal["top1", "top5", "balanced_acc", "macro_f1"]
_ABSENT = -1e4  # logit of a class that has no training image (softmax -> 0, stays finite)


def _default_alphas() -> list[float]:
    return [round(0.1 * i, 1) for i in range(11)]


@dataclass
class ClassificationConfig:
    """params.yaml section `classification`.

    alphas: alpha grid for ``alpha * p_clip + (1 - alpha) * p_cnn`` (0 and 1 are always added).
    metric: what alpha, the CLIP branch of the fusion and the ``chosen`` method are chosen by on val.
    C / max_iter: linear-probe regularisation and iterations. prototype_temperature: softmax temperature of the
    prototype cosine similarities. zero_shot_scale: CLIP logit scale. calibrate: fit per-branch temperatures on val.
    stacker_folds: k of the stratified k-fold that makes the out-of-fold training probabilities.
    stacker_holdout: fraction of the training rows held out (stratified) from the stacker fit for an inner check.
    stacker_C: the stacker's LogisticRegression C.
    """

    alphas: list[float] = field(default_factory=_default_alphas)
    metric: ClsMetric = "top1"
    C: float = 1.0
    max_iter: int = 2000
    prototype_temperature: float = 0.01
    zero_shot_scale: float = 100.0
    calibrate: bool = True
    stacker_folds: int = 5
    stacker_holdout: float = 0.25
    stacker_C: float = 1.0

    def validate(self, section: str) -> None:
        Checks(section).alphas("alphas", self.alphas) \
            .that(0.0 <= self.stacker_holdout < 0.9, "stacker_holdout", self.stacker_holdout, "must be in [0, 0.9)") \
            .positive(C=self.C, max_iter=self.max_iter, prototype_temperature=self.prototype_temperature,
                      zero_shot_scale=self.zero_shot_scale, stacker_C=self.stacker_C) \
            .that(self.stacker_folds >= 2, "stacker_folds", self.stacker_folds, "must be >= 2").done()


@dataclass
class ClassSplit:
    """One split's inputs: CLIP image embeddings [N, E] (or None), CNN global features [N, D] (or None), labels [N]."""

    labels: np.ndarray
    clip: np.ndarray | None = None
    cnn: np.ndarray | None = None


# --------------------------------------------------------------------------- CLIP branches


def class_prompts(class_name: str) -> list[str]:
    """The ``TEMPLATES`` filled with ``class_name`` (underscores become spaces)."""
    name = class_name.replace("_", " ")
    return [t.format(name) for t in TEMPLATES]


def _normalise(x) -> np.ndarray:
    """Rows scaled to unit L2 norm: float64 [N, E]."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def average_templates(template_embs) -> np.ndarray:
    """Per-class text embedding: normalised mean of the normalised template embeddings. [C, T, E] -> [C, E]."""
    return _normalise(_normalise(template_embs).mean(axis=1))


def clip_zero_shot_logits(text_embs, image_embs, scale: float = 100.0) -> np.ndarray:
    """``scale * cos``: text_embs [C, E], image_embs [N, E] -> logits [N, C]."""
    return scale * _normalise(image_embs) @ _normalise(text_embs).T


def prototype_logits(train_embs, train_labels, image_embs, n_classes: int, temperature: float = 0.01) -> np.ndarray:
    """``cos(image, class centroid) / temperature`` [N, C]; classes without training images get a very low logit.

    Centroids come from ``anomaly_core.kit.prototypes.class_centroids`` (normalised mean of the normalised
    shot embeddings). ``softmax`` of these logits is ``image_protos.classify``; logits are returned instead of its
    float32 probabilities because at temperature 0.01 those underflow to 0 (log -> -inf), which temperature scaling
    and the stacker cannot use.
    """
    y = np.asarray(train_labels).astype(np.int64)
    present = np.unique(y)  # [P] classes with at least one shot
    cents = class_centroids(torch.as_tensor(np.asarray(train_embs)).float(),
                            torch.as_tensor(np.searchsorted(present, y)), len(present))  # [P, E] unit
    logits = np.full((len(image_embs), n_classes), _ABSENT)
    logits[:, present] = _normalise(image_embs) @ cents.double().numpy().T / temperature
    return logits


# --------------------------------------------------------------------------- CNN linear probe


def global_pool(level) -> np.ndarray:
    """Mean over the spatial dims of a CNN feature map: [N, C, h, w] -> float64 [N, C]."""
    x = level.float().numpy() if isinstance(level, torch.Tensor) else np.asarray(level, dtype=np.float64)
    return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=-1).astype(np.float64)


def linear_probe(train_feats, train_labels, C: float = 1.0, seed: int = 0, max_iter: int = 2000) -> Pipeline:
    """Fit StandardScaler + LogisticRegression(class_weight='balanced') on [N, D] features and labels [N]."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(train_labels).astype(np.int64)
    if len(np.unique(y)) < 2:
        raise DataError("linear probe: the training split holds a single class")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced",
                                                               random_state=seed))
    return model.fit(np.asarray(train_feats, dtype=np.float64), y)


def _full_columns(values: np.ndarray, classes: np.ndarray, n_classes: int, fill: float) -> np.ndarray:
    """Scatter per-model-class columns [N, K] into [N, C]; classes the model never saw get ``fill``."""
    out = np.full((values.shape[0], n_classes), fill, dtype=np.float64)
    out[:, classes] = values
    return out


def predict_logits(model, feats, n_classes: int) -> np.ndarray:
    """Decision values of a fitted probe as logits [N, C] (binary: [0, d], so softmax = sigmoid(d))."""
    d = model.decision_function(np.asarray(feats, dtype=np.float64))
    if d.ndim == 1:
        d = np.stack([np.zeros_like(d), d], axis=1)
    return _full_columns(d, model.classes_, n_classes, _ABSENT)


# --------------------------------------------------------------------------- alpha fusion


def _metric(labels, probs, metric: str) -> float:
    from anomaly_core.metrics import classification_metrics

    return classification_metrics(labels, probs)[metric]


def fuse_probs(p_clip: np.ndarray, p_cnn: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * p_clip + (1 - alpha) * p_cnn`` (both [N, C])."""
    return alpha * p_clip + (1.0 - alpha) * p_cnn


def alpha_fusion(p_clip, p_cnn, labels_val, grid: Sequence[float],
                 metric: str) -> tuple[float, list[tuple[float, float]]]:
    """Sweep alpha on val probabilities [N, C] (already temperature-scaled): (best alpha, curve [(alpha, value)]).

    0 and 1 are added to ``grid``; ties per ``anomaly_core.fusion.TIE_RULE`` (closest to 0.5).
    """
    curve = [(a, _metric(labels_val, fuse_probs(p_clip, p_cnn, a), metric)) for a in with_endpoints(grid)]
    return best_on_grid(curve), curve


# --------------------------------------------------------------------------- stacker


class Stacker:
    """Logistic regression (class_weight='balanced') on concatenated branch probabilities [N, B*C]."""

    def __init__(self, C: float = 1.0, seed: int = 0, max_iter: int = 2000):
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced", random_state=seed)
        self.n_classes = 0

    def fit(self, probs: Sequence[np.ndarray], labels) -> "Stacker":
        """``probs``: one [N, C] array per branch, OUT-OF-FOLD for these training rows; labels [N]."""
        y = np.asarray(labels).astype(np.int64)
        if len(np.unique(y)) < 2:
            raise DataError("stacker: its training rows hold a single class")
        self.n_classes = probs[0].shape[1]
        self.model.fit(np.concatenate(probs, axis=1), y)
        return self

    def predict_proba(self, probs: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities [N, C] (classes unseen by the stacker get 0)."""
        p = self.model.predict_proba(np.concatenate(probs, axis=1))
        return _full_columns(p, self.model.classes_, self.n_classes, 0.0)


def _folds(labels: np.ndarray, k_max: int, seed: int) -> StratifiedKFold:
    """Stratified k-fold with k = min(k_max, smallest class count); DataError if a class has < 2 images."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise DataError("stacker skipped: out-of-fold probabilities need >= 2 training images per class "
                        f"(smallest class has {smallest}); raise `shots`")
    return StratifiedKFold(n_splits=min(k_max, smallest), shuffle=True, random_state=seed)


def oof_logits(train: ClassSplit, text_embs, n_classes: int, cfg: ClassificationConfig,
               seed: int) -> dict[str, np.ndarray]:
    """Out-of-fold logits [N, C] of every available branch for the training rows (same folds for all branches)."""
    y = np.asarray(train.labels).astype(np.int64)
    out = {b: np.zeros((len(y), n_classes)) for b in _available(train, text_embs)}
    if "clip_zero_shot" in out:  # training-free: in-sample is out-of-fold
        out["clip_zero_shot"] = clip_zero_shot_logits(text_embs, train.clip, cfg.zero_shot_scale)
    for fit, held in _folds(y, cfg.stacker_folds, seed).split(np.zeros(len(y)), y):
        if "clip_prototypes" in out:
            out["clip_prototypes"][held] = prototype_logits(train.clip[fit], y[fit], train.clip[held], n_classes,
                                                            cfg.prototype_temperature)
        if "cnn_linear" in out:
            probe = linear_probe(train.cnn[fit], y[fit], cfg.C, seed, cfg.max_iter)
            out["cnn_linear"][held] = predict_logits(probe, train.cnn[held], n_classes)
    return out


def stacker_split(labels, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit rows, inner-check rows) of the training split; all rows / none when a split is infeasible."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels).astype(np.int64)
    idx = np.arange(len(y))
    if holdout <= 0:
        return idx, idx[:0]
    try:
        fit, check = train_test_split(idx, test_size=holdout, stratify=y, random_state=seed)
    except ValueError:  # a class with one image, or fewer held-out rows than classes
        return idx, idx[:0]
    return np.sort(fit), np.sort(check)


def choose(stacker_val: float, best_single_branch_val: float) -> dict:
    """The stacker may be chosen only if its val score is not below its best single branch's val score."""
    worse = stacker_val < best_single_branch_val - 1e-12
    return {"stacker_val": stacker_val, "best_single_branch_val": best_single_branch_val,
            "worse_than_best_single": bool(worse), "usable": not worse}


def pick_method(val_scores: dict[str, float], stacker_usable: bool) -> str:
    """The ``chosen`` method: highest val score; order of ``val_scores`` breaks ties; a flagged stacker is excluded."""
    names = [m for m in val_scores if m != "stacker" or stacker_usable]
    best = max(val_scores[m] for m in names)
    return next(m for m in names if val_scores[m] >= best - 1e-12)


# --------------------------------------------------------------------------- report + full run


def classification_report(labels, probs_by_method: dict[str, np.ndarray], chosen: str | None = None) -> dict:
    """{method: {top1, top5, balanced_acc, macro_f1}} for labels [N] and probs [N, C]; plus ``chosen`` if given."""
    from anomaly_core.metrics import classification_metrics

    report = {m: classification_metrics(labels, p) for m, p in probs_by_method.items()}
    if chosen is not None:
        report["chosen"] = dict(report[chosen])
    return report


def _available(split: ClassSplit, text_embs) -> list[str]:
    have = {"clip_zero_shot": split.clip is not None and text_embs is not None,
            "clip_prototypes": split.clip is not None, "cnn_linear": split.cnn is not None}
    return [b for b in BRANCHES if have[b]]


def branch_logits(train: ClassSplit, evals: dict[str, ClassSplit], text_embs, n_classes: int,
                  cfg: ClassificationConfig, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Branches fitted on the whole training split: {split: {branch: logits [N, C]}} for each split of ``evals``."""
    branches = _available(train, text_embs)
    if not branches:
        raise DataError("classification: no branch available (need CLIP embeddings and/or CNN features)")
    probe = linear_probe(train.cnn, train.labels, cfg.C, seed, cfg.max_iter) if "cnn_linear" in branches else None
    out: dict[str, dict[str, np.ndarray]] = {}
    for split, ev in evals.items():
        out[split] = {}
        if "clip_zero_shot" in branches:
            out[split]["clip_zero_shot"] = clip_zero_shot_logits(text_embs, ev.clip, cfg.zero_shot_scale)
        if "clip_prototypes" in branches:
            out[split]["clip_prototypes"] = prototype_logits(train.clip, train.labels, ev.clip, n_classes,
                                                             cfg.prototype_temperature)
        if probe is not None:
            out[split]["cnn_linear"] = predict_logits(probe, ev.cnn, n_classes)
    return out


def _run_stacker(train, text_embs, n_classes, temps, probs, y_val, cfg, seed) -> tuple[dict, dict[str, np.ndarray]]:
    """Fit the stacker on out-of-fold training probabilities: (stacker report, {split: probs [N, C]})."""
    names = list(temps)
    oof = oof_logits(train, text_embs, n_classes, cfg, seed)
    p_oof = [softmax_t(oof[b], temps[b]) for b in names]  # each [N_train, C]
    y = np.asarray(train.labels).astype(np.int64)
    fit, check = stacker_split(y, cfg.stacker_holdout, seed)
    stacker = Stacker(cfg.stacker_C, seed, cfg.max_iter).fit([p[fit] for p in p_oof], y[fit])
    out = {split: stacker.predict_proba([probs[split][b] for b in names]) for split in probs}
    inner = None
    if len(check) and len(np.unique(y[check])) >= 2:
        inner = {"n": int(len(check)), "stacker": _metric(y[check], stacker.predict_proba([p[check] for p in p_oof]),
                                                          cfg.metric),
                 **{b: _metric(y[check], p[check], cfg.metric) for b, p in zip(names, p_oof)}}
    best_single = max(_metric(y_val, probs["val"][b], cfg.metric) for b in names)
    report = {"inputs": names, "n_fit": int(len(fit)), "inner_check": inner,
              **choose(_metric(y_val, out["val"], cfg.metric), best_single)}
    return report, out


def run_classification(train: ClassSplit, val: ClassSplit, test: ClassSplit, n_classes: int,
                       cfg: ClassificationConfig, text_embs=None, seed: int = 0) -> tuple[dict, dict]:
    """All branches, alpha fusion, stacker and the val choice. text_embs [C, E] (None: no zero-shot branch).

    Returns (test report {method: metrics} incl. ``chosen``, details: temperatures, alpha sweep, stacker flags,
    val metrics of every method, the chosen method).
    """
    logits = branch_logits(train, {"val": val, "test": test}, text_embs, n_classes, cfg, seed)
    y_val, y_test = np.asarray(val.labels), np.asarray(test.labels)
    names = list(logits["val"])
    temps = {b: fit_temperature(logits["val"][b], y_val) if cfg.calibrate else 1.0 for b in names}
    probs = {s: {b: softmax_t(logits[s][b], temps[b]) for b in names} for s in logits}  # {split: {branch: [N, C]}}
    val_scores = {b: _metric(y_val, probs["val"][b], cfg.metric) for b in names}
    details: dict = {"metric": cfg.metric, "temperatures": temps, "tie_rule": TIE_RULE}
    clip_names = [b for b in ("clip_prototypes", "clip_zero_shot") if b in names]
    if clip_names and "cnn_linear" in names:
        clip_b = max(clip_names, key=lambda b: val_scores[b])  # first (prototypes) on ties
        alpha, curve = alpha_fusion(probs["val"][clip_b], probs["val"]["cnn_linear"], y_val, cfg.alphas, cfg.metric)
        for s in probs:
            probs[s]["alpha_fusion"] = fuse_probs(probs[s][clip_b], probs[s]["cnn_linear"], alpha)
        val_scores = {"alpha_fusion": dict(curve)[alpha], **val_scores}
        details.update(alpha=alpha, alpha_clip_branch=clip_b, alpha_curve=[[a, v] for a, v in curve])
    usable = False
    if len(names) >= 2:
        try:
            branch_probs = {s: {b: probs[s][b] for b in names} for s in probs}
            stack_report, stack_probs = _run_stacker(train, text_embs, n_classes, temps, branch_probs, y_val, cfg, seed)
            for s in probs:
                probs[s]["stacker"] = stack_probs[s]
            val_scores["stacker"], usable = stack_report["stacker_val"], stack_report["usable"]
            details["stacker"] = stack_report
        except DataError as exc:
            details["stacker"] = {"skipped": str(exc)}
    chosen = pick_method(val_scores, usable)
    details.update(chosen=chosen, val=classification_report(y_val, probs["val"]), val_choice_scores=val_scores)
    return classification_report(y_test, probs["test"], chosen), details


def class_splits(store, rows, cnn_branch: str = "visual") -> tuple[list[str], dict[str, ClassSplit]]:
    """Classification inputs from cached features: (class names, {train (the k shots), val, test: ClassSplit}).

    CLIP: global image embeddings; CNN: the last cached level, global-average pooled.
    """
    from anomaly_core.data.manifest import categories, class_label

    multi = len(categories(rows)) > 1
    names = sorted({class_label(r, multi) for r in rows})
    parts = {"train": [r for r in rows if r.split == "train" and r.shot],
             "val": [r for r in rows if r.split == "val"], "test": [r for r in rows if r.split == "test"]}
    out = {}
    for split, part in parts.items():
        labels = np.array([names.index(class_label(r, multi)) for r in part])
        clip = store.get("clip", part)["global"].numpy() if store.has("clip") else None
        cnn = global_pool(store.levels(store.get(cnn_branch, part))[-1]) if store.has(cnn_branch) else None
        out[split] = ClassSplit(labels, clip, cnn)
    return names, out
