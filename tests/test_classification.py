"""Few-shot classification: temperature scaling, branches, alpha fusion, the stratified out-of-fold stacker."""
from __future__ import annotations

import numpy as np
import pytest

from anomaly_core.calibration import T_MAX, fit_temperature, nll, softmax_t
from anomaly_core.classification import (
    ClassificationConfig,
    ClassSplit,
    Stacker,
    alpha_fusion,
    average_templates,
    choose,
    class_prompts,
    classification_report,
    clip_zero_shot_logits,
    global_pool,
    linear_probe,
    oof_logits,
    pick_method,
    predict_logits,
    prototype_logits,
    run_classification,
    stacker_split,
)
from anomaly_core.config import build
from anomaly_core.errors import ConfigError, DataError
from anomaly_core.metrics import classification_metrics

C = 4


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("true_t", [0.5, 2.0, 4.0])
def test_temperature_recovers_known_t(true_t):
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3.0, (6000, 5))  # logits [N, C]
    p = softmax_t(z, true_t)
    labels = np.array([rng.choice(5, p=row) for row in p])  # labels ~ softmax(z / T)
    t = fit_temperature(z, labels)
    assert abs(t - true_t) / true_t < 0.15
    assert nll(z, labels, t) <= nll(z, labels, 1.0) + 1e-9


def test_temperature_clamped_and_softmax():
    z = np.array([[0.0, 1.0], [0.0, 1.0]])
    assert fit_temperature(z, [0, 0]) == pytest.approx(T_MAX)  # the wrong class is always top: flatten fully
    p = softmax_t(np.array([[0.0, np.log(3.0)]]), 1.0)
    assert p == pytest.approx(np.array([[0.25, 0.75]]))
    with pytest.raises(DataError):
        fit_temperature(z, [0, 2])


# --------------------------------------------------------------------------- synthetic 4-class problem


def _problem(seed: int = 0, n_train: int = 12, n_val: int = 60, n_test: int = 120):
    """CLIP embeddings separate classes {0,1} vs {2,3} well; CNN features separate {0,2} vs {1,3}: complementary."""
    rng = np.random.default_rng(seed)
    e, d = 16, 24
    clip_means = rng.normal(0, 1, (C, e))
    clip_means[1] = clip_means[0] + rng.normal(0, 0.25, e)  # CLIP confuses 0/1 and 2/3
    clip_means[3] = clip_means[2] + rng.normal(0, 0.25, e)
    cnn_means = rng.normal(0, 1, (C, d))
    cnn_means[2] = cnn_means[0] + rng.normal(0, 0.25, d)  # CNN confuses 0/2 and 1/3
    cnn_means[3] = cnn_means[1] + rng.normal(0, 0.25, d)

    def split(n_per_class):
        y = np.repeat(np.arange(C), n_per_class)
        return ClassSplit(labels=y, clip=clip_means[y] + rng.normal(0, 0.5, (len(y), e)),
                          cnn=cnn_means[y] + rng.normal(0, 0.5, (len(y), d)))

    text = clip_means + rng.normal(0, 0.6, (C, e))
    return split(n_train), split(n_val // C), split(n_test // C), text


def test_prompts_and_branch_shapes():
    prompts = class_prompts("metal_nut")
    assert len(prompts) == 5 and all("metal nut" in p for p in prompts) and len(set(prompts)) == 5
    train, val, _, text = _problem()
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    assert average_templates(np.stack([text, 2 * text], axis=1)) == pytest.approx(unit)
    zs = clip_zero_shot_logits(text, val.clip, scale=100)
    assert zs.shape == (len(val.labels), C) and np.abs(zs).max() <= 100 + 1e-9
    pl = prototype_logits(train.clip, train.labels, val.clip, C, temperature=0.01)
    assert pl.shape == (len(val.labels), C) and np.abs(pl).max() <= 100 + 1e-9
    missing = prototype_logits(train.clip[train.labels != 3], train.labels[train.labels != 3], val.clip, C)
    assert (softmax_t(missing)[:, 3] < 1e-12).all()  # a class without shots never wins
    assert global_pool(np.ones((2, 3, 4, 5))).shape == (2, 3)
    probe = linear_probe(train.cnn, train.labels, C=1.0, seed=0)
    assert predict_logits(probe, val.cnn, C).shape == (len(val.labels), C)
    binary = linear_probe(train.cnn[train.labels < 2], train.labels[train.labels < 2])
    lb = predict_logits(binary, val.cnn, C)
    assert lb.shape == (len(val.labels), C) and np.allclose(softmax_t(lb)[:, 2:], 0)


def test_alpha_fusion_on_val():
    train, val, _, text = _problem()
    p_clip = softmax_t(prototype_logits(train.clip, train.labels, val.clip, C), 1.0)
    p_cnn = softmax_t(predict_logits(linear_probe(train.cnn, train.labels), val.cnn, C), 1.0)
    alpha, curve = alpha_fusion(p_clip, p_cnn, val.labels, [0.3, 0.5, 0.7], "top1")
    values = dict(curve)
    assert sorted(values) == [0.0, 0.3, 0.5, 0.7, 1.0]
    assert values[alpha] >= max(values[0.0], values[1.0])
    assert values[alpha] > max(values[0.0], values[1.0])  # complementary branches: the mix is strictly better


def test_oof_and_stratified_split():
    train, _, _, text = _problem()
    cfg = ClassificationConfig(stacker_folds=3)
    oof = oof_logits(train, text, C, cfg, seed=0)
    assert set(oof) == {"clip_zero_shot", "clip_prototypes", "cnn_linear"}
    in_sample = predict_logits(linear_probe(train.cnn, train.labels), train.cnn, C)
    acc_in = np.mean(in_sample.argmax(1) == train.labels)
    acc_oof = np.mean(oof["cnn_linear"].argmax(1) == train.labels)
    assert acc_in == 1.0 and acc_oof < acc_in  # out-of-fold probabilities are not the overfitted in-sample ones
    fit, check = stacker_split(train.labels, 0.25, seed=0)
    assert len(set(fit) | set(check)) == len(train.labels) and not set(fit) & set(check)
    assert (np.bincount(train.labels[check], minlength=C) == 3).all()  # stratified: 25% of 12 per class
    one_shot = ClassSplit(labels=np.arange(C), clip=train.clip[:C], cnn=train.cnn[:C])
    with pytest.raises(DataError, match=">= 2 training images per class"):
        oof_logits(one_shot, text, C, cfg, seed=0)


def test_run_classification_stacker_beats_chance():
    train, val, test, text = _problem()
    cfg = build(ClassificationConfig, {"alphas": [0.25, 0.5, 0.75], "stacker_folds": 4}, "classification")
    report, details = run_classification(train, val, test, C, cfg, text_embs=text, seed=0)
    assert set(report) == {"clip_zero_shot", "clip_prototypes", "cnn_linear", "alpha_fusion", "stacker", "chosen"}
    assert set(report["stacker"]) == {"top1", "top5", "balanced_acc", "macro_f1"}
    st = details["stacker"]
    assert st["n_fit"] == 36 and st["inner_check"]["n"] == 12
    assert report["stacker"]["top1"] > 0.5 and details["val"]["stacker"]["balanced_acc"] > 0.5  # chance = 0.25
    assert set(details["temperatures"]) == {"clip_zero_shot", "clip_prototypes", "cnn_linear"}
    assert details["alpha_clip_branch"] in ("clip_prototypes", "clip_zero_shot")
    assert details["chosen"] in report and report["chosen"] == report[details["chosen"]]
    scores = details["val_choice_scores"]
    assert scores[details["chosen"]] == max(s for m, s in scores.items() if m != "stacker" or st["usable"])


def test_bad_stacker_is_flagged_and_not_chosen():
    train, val, _, text = _problem()
    cfg = ClassificationConfig()
    names = ["clip_prototypes", "cnn_linear"]
    oof = oof_logits(train, text, C, cfg, seed=0)
    shuffled = np.random.default_rng(0).permutation(train.labels)  # a deliberately bad stacker: labels scrambled
    bad = Stacker(seed=0).fit([softmax_t(oof[b]) for b in names], shuffled)
    val_probs = {"clip_prototypes": softmax_t(prototype_logits(train.clip, train.labels, val.clip, C)),
                 "cnn_linear": softmax_t(predict_logits(linear_probe(train.cnn, train.labels), val.cnn, C))}
    p_bad = bad.predict_proba([val_probs[b] for b in names])
    scores = {b: classification_metrics(val.labels, p)["top1"] for b, p in val_probs.items()}
    scores["stacker"] = classification_metrics(val.labels, p_bad)["top1"]
    verdict = choose(scores["stacker"], max(scores[b] for b in names))
    assert verdict["worse_than_best_single"] and not verdict["usable"]
    assert pick_method(scores, verdict["usable"]) != "stacker"
    # a flagged stacker is excluded even when its number is the highest
    assert pick_method({"cnn_linear": 0.5, "stacker": 0.9}, stacker_usable=False) == "cnn_linear"
    assert choose(0.8, 0.8)["usable"] and pick_method({"alpha_fusion": 0.8, "stacker": 0.8}, True) == "alpha_fusion"


def test_report_and_config():
    y = np.array([0, 1, 2, 3])
    probs = np.eye(C)[[0, 1, 2, 0]]
    rep = classification_report(y, {"a": probs}, chosen="a")
    assert rep["a"]["top1"] == 0.75 and rep["chosen"] == rep["a"]
    with pytest.raises(ConfigError):
        build(ClassificationConfig, {"metric": "image_auroc"}, "classification")
    with pytest.raises(ConfigError):
        build(ClassificationConfig, {"stacker_holdout": 0.95}, "classification")


def test_without_text_and_one_shot_skips_stacker():
    train, val, test, _ = _problem(n_train=1)
    report, details = run_classification(train, val, test, C, ClassificationConfig(), text_embs=None, seed=0)
    assert "clip_zero_shot" not in report and "alpha_fusion" in report and "stacker" not in report
    assert "skipped" in details["stacker"]
