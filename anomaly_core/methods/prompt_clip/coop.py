"""CoOp prompt learning for CLIP anomaly detection (method `prompt_clip`).

The hand-written templates of the prompt ensemble ("a photo of a {}.") are replaced by `n_ctx` learnable
context vectors in the text encoder's token-embedding space: each prompt is tokenised as
`"X X X X {state phrase}."` (e.g. "X X X X flawless bottle.") for the 6 normal and 10 abnormal state
phrases of `anomaly_core.kit.prompts`, and the frozen text encoder's `embed_hook` swaps the embeddings at the
X positions for the context vectors. `class_specific=False` shares one context between the normal and the
abnormal prompts (CoOp's unified context); `class_specific=True` learns one context per state class
(normal, abnormal), CoOp's class-specific context. One prompt learner is trained per category. With
n_ctx = 4 the context starts from the embeddings of "a photo of a", so the untrained learner equals a
zero-shot template; other n_ctx start from N(0, 0.02^2) (seeded).

The anchors are the normalised means of the normalised prompt embeddings of each group -> [2, E]
(normal, abnormal); scoring is zero-shot CLIP's (`anomaly_core.kit.anchors`) with these anchors.

Training (Adam) uses cached CLIP features only: k-shot normal patch tokens (all levels) and globals are
normal; val anomalies give abnormal patches (mask coverage >= `min_coverage`), extra normal patches
(zero coverage) and abnormal globals. Loss = class-balanced CE on patch logits + the same on image logits,
logits = cos(token, anchor) / temperature.

Early stopping / checkpoint selection (never on test): `split_holdout` holds out
round(holdout_fraction * n) of the n >= 2 val anomalies (at least 1) together with the val normal images
(or, without val normals, the same share of the shots); after each epoch the same loss is computed on the
held-out tokens, the context with the lowest held-out loss (the initial context included, as epoch 0) is
kept, and training stops after `patience` epochs without an improvement larger than `min_delta`.
Without a holdout (fewer than 2 val anomalies or `use_val_anomalies=False`) the criterion is the epoch's
mean training loss (plateau: `patience` epochs without a `min_delta` decrease). The history records which
criterion was used. The val split is partly training data, so this method's val metrics are optimistic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from anomaly_core.config import Checks
from anomaly_core.data.holdout import split_holdout
from anomaly_core.data.manifest import Row, categories
from anomaly_core.errors import ConfigError, WeightsError
from anomaly_core.io import load_checkpoint, save_checkpoint
from anomaly_core.kit.anchors import clip_anchor_scores
from anomaly_core.kit.clip_data import ClipTrainData, clip_train_data, resample
from anomaly_core.kit.losses import balanced_ce
from anomaly_core.kit.scores import Scores, category_seed
from anomaly_core.store import FeatureStore

__all__ = ["CoopConfig", "PromptLearner", "state_phrases", "anchor_logits", "coop_loss", "fit_coop",
           "train_prompt_clip", "score_prompt_clip", "save_prompt_clip", "load_prompt_clip", "KIND"]

KIND = "prompt_clip"
INIT_WORDS = "a photo of a"


@dataclass
class CoopConfig:
    n_ctx: int = 4
    class_specific: bool = False   # one context per state class (normal, abnormal) instead of a shared one
    epochs: int = 30               # maximum epochs (one pass over the normal patch tokens each)
    lr: float = 0.002              # Adam
    batch_size: int = 4096         # normal patch tokens per step (abnormal ones resampled to match)
    patience: int = 5              # epochs without improvement before stopping
    seed: int = 0
    sigma: float = 4.0             # map smoothing at scoring (as zero_shot)
    image_weight: float = 0.5      # image score = w * p(global) + (1 - w) * max(map)
    temperature: float = 0.01      # logit temperature (CLIP's logit scale 100), training and scoring
    use_val_anomalies: bool = True
    holdout_fraction: float = 0.25  # share of the val anomalies held out for early stopping
    min_delta: float = 1e-4        # smallest criterion decrease that counts as an improvement
    min_coverage: float = 0.5      # a grid cell is abnormal when >= this share of it is masked

    def validate(self, section: str) -> None:
        Checks(section).positive(n_ctx=self.n_ctx, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                 patience=self.patience, temperature=self.temperature) \
            .open_unit(min_coverage=self.min_coverage).fraction(holdout_fraction=self.holdout_fraction) \
            .unit(image_weight=self.image_weight).non_negative(sigma=self.sigma, min_delta=self.min_delta).done()


def state_phrases(category: str) -> tuple[list[str], list[str]]:
    """The prompt ensemble's state phrases filled with the class phrase: (normal [6], abnormal [10])."""
    from anomaly_core.kit.prompts import ABNORMAL_STATES, NORMAL_STATES, class_phrase

    name = class_phrase(category)
    return ([s.replace("{}", name) for s in NORMAL_STATES], [s.replace("{}", name) for s in ABNORMAL_STATES])


def _text_module(clip) -> nn.Module:
    return getattr(clip.model, "text", None) or clip.model


@torch.no_grad()
def _init_context(clip, n_ctx: int, seed: int) -> torch.Tensor:
    """[n_ctx, W]: the token embeddings of "a photo of a" when n_ctx matches its length, else N(0, 0.02^2)."""
    ids = clip.tokenize([INIT_WORDS])[0]
    n_words = int((ids != 0).sum()) - 2  # without start / end tokens
    if n_words == n_ctx:
        return _text_module(clip).token_embedding(ids[1:1 + n_ctx]).float().clone()
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(n_ctx, clip.text_width, generator=g)


class PromptLearner(nn.Module):
    """Learnable context [n_ctx, W] (or [2, n_ctx, W] class-specific) for one category's state prompts.

    The CLIP backbone is not a submodule (the state dict is the context and the last anchors only); pass it
    to `compute_anchors` / `refresh`.
    """

    def __init__(self, clip, category: str, n_ctx: int = 4, class_specific: bool = False, seed: int = 0):
        super().__init__()
        normal, abnormal = state_phrases(category)
        prefix = " ".join(["X"] * n_ctx)
        self.texts = [f"{prefix} {s}." for s in normal + abnormal]
        ids = clip.tokenize(self.texts)  # [T, 77]
        x_id = clip.tokenize(["X"])[0, 1]
        if not bool((ids[:, 1:1 + n_ctx] == x_id).all()) or bool((ids[:, 1 + n_ctx] == x_id).any()):
            raise ConfigError("prompt_clip: the tokenizer does not map 'X' to one token per context slot")
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("groups", torch.tensor([0] * len(normal) + [1] * len(abnormal)), persistent=False)
        init = _init_context(clip, n_ctx, seed)
        self.ctx = nn.Parameter(torch.stack([init, init.clone()]) if class_specific else init)
        self.register_buffer("anchors", torch.zeros(2, clip.embed_dim))  # [2, E], set by `refresh`
        self.category, self.n_ctx, self.class_specific = category, n_ctx, class_specific

    def context(self) -> torch.Tensor:
        """Per-prompt context [T, n_ctx, W]."""
        t = self.token_ids.shape[0]
        return self.ctx[self.groups] if self.class_specific else self.ctx.expand(t, -1, -1)

    def embed_hook(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, 77, W] -> the same with positions 1..n_ctx replaced by the context."""
        return torch.cat([x[:, :1], self.context().to(x.dtype), x[:, 1 + self.n_ctx:]], dim=1)

    def compute_anchors(self, clip) -> torch.Tensor:
        """Differentiable anchors [2, E] (normal, abnormal), unit norm."""
        emb = F.normalize(clip.encode_text(self.token_ids, embed_hook=self.embed_hook).float(), dim=-1)  # [T, E]
        return torch.stack([F.normalize(emb[self.groups == g].mean(0), dim=-1) for g in (0, 1)])

    @torch.no_grad()
    def refresh(self, clip) -> torch.Tensor:
        """Recompute and store `anchors` from the current context; returns them."""
        self.anchors.copy_(self.compute_anchors(clip))
        return self.anchors


# ---------------------------------------------------------------------------- loss and training


def anchor_logits(x: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """x [..., E], anchors [2, E] -> [..., 2] = cos / temperature."""
    return F.normalize(x.float(), dim=-1) @ anchors.T / temperature


def coop_loss(anchors: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor, normal_glob: torch.Tensor,
              abnormal_glob: torch.Tensor, temperature: float) -> torch.Tensor:
    """Balanced CE on patch logits (normal [Bn, E], abnormal [Ba, E]) + balanced CE on image logits."""
    loss = balanced_ce(anchor_logits(normal, anchors, temperature), anchor_logits(abnormal, anchors, temperature))
    if normal_glob.shape[0] + abnormal_glob.shape[0]:
        loss = loss + balanced_ce(anchor_logits(normal_glob, anchors, temperature),
                                  anchor_logits(abnormal_glob, anchors, temperature))
    return loss


@torch.no_grad()
def _data_loss(learner: PromptLearner, clip, data: ClipTrainData, temperature: float) -> float:
    anchors = learner.compute_anchors(clip)
    return float(coop_loss(anchors, data.normal_patches, data.abnormal_patches, data.normal_globals,
                           data.abnormal_globals, temperature))


def _epoch(learner: PromptLearner, clip, opt, data: ClipTrainData, cfg: CoopConfig, g: torch.Generator) -> float:
    """One pass over the normal patches; returns the mean step loss."""
    perm, total, steps = torch.randperm(data.normal_patches.shape[0], generator=g), 0.0, 0
    for start in range(0, perm.numel(), cfg.batch_size):
        normal = data.normal_patches[perm[start:start + cfg.batch_size]]
        abnormal = resample(data.abnormal_patches, normal.shape[0], g)
        loss = coop_loss(learner.compute_anchors(clip), normal, abnormal, data.normal_globals,
                         data.abnormal_globals, cfg.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total, steps = total + float(loss.detach()), steps + 1
    return total / max(steps, 1)


def fit_coop(learner: PromptLearner, clip, train: ClipTrainData, holdout: ClipTrainData | None, cfg: CoopConfig,
             seed: int = 0, progress: bool = False, desc: str = KIND) -> dict[str, Any]:
    """Train the context with early stopping (see the module docstring); the best context is restored and
    `learner.anchors` refreshed. Returns {"loss", "criterion_value" (per epoch), "criterion",
    "best_epoch", "best_value", "epochs_run"}."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([learner.ctx], lr=cfg.lr)
    criterion = "holdout_loss" if holdout is not None else "train_loss_plateau"
    history: dict[str, Any] = {"loss": [], "criterion_value": [], "criterion": criterion}
    best, best_epoch = float("inf"), 0
    if holdout is not None:
        best = _data_loss(learner, clip, holdout, cfg.temperature)  # epoch 0: the initial context
        history["initial_holdout_loss"] = best
    best_ctx, wait = learner.ctx.detach().clone(), 0
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=desc, leave=False, disable=not progress):
        train_loss = _epoch(learner, clip, opt, train, cfg, g)
        value = _data_loss(learner, clip, holdout, cfg.temperature) if holdout is not None else train_loss
        history["loss"].append(train_loss)
        history["criterion_value"].append(value)
        if value < best - cfg.min_delta:
            best, best_epoch, best_ctx, wait = value, epoch, learner.ctx.detach().clone(), 0
        else:
            wait += 1
            if wait >= cfg.patience:
                break
    with torch.no_grad():
        learner.ctx.copy_(best_ctx)
    learner.refresh(clip)
    history.update(best_epoch=best_epoch, best_value=best, epochs_run=len(history["loss"]))
    return history


# ---------------------------------------------------------------------------- stage entry points


def train_prompt_clip(store: FeatureStore, rows: Sequence[Row], clip, cfg: CoopConfig, size: int,
                      progress: bool = False) -> tuple[dict[str, PromptLearner], dict[str, dict]]:
    """One PromptLearner per category, trained through the frozen `clip` text encoder on cached features.

    Returns ({category: learner with `.anchors` [2, E] set}, {category: {"history", "split", "data"}}).
    """
    learners, report = {}, {}
    for cat in categories(rows):
        seed = category_seed(cfg.seed, KIND, cat)
        split = split_holdout(rows, cat, cfg.seed, KIND, cfg.holdout_fraction, cfg.use_val_anomalies)
        train = clip_train_data(store, split.train_normal, split.train_anomalous, size, cfg.min_coverage)
        holdout = (clip_train_data(store, split.holdout_normal, split.holdout_anomalous, size, cfg.min_coverage)
                   if split.has_holdout else None)
        learner = PromptLearner(clip, cat, cfg.n_ctx, cfg.class_specific, seed)
        history = fit_coop(learner, clip, train, holdout, cfg, seed, progress, f"{KIND}/{cat}")
        learners[cat] = learner
        report[cat] = {"history": history, "split": split.counts(), "data": train.counts()}
    return learners, report


def score_prompt_clip(store: FeatureStore, rows: Sequence[Row], anchors: dict[str, torch.Tensor | PromptLearner],
                      cfg: CoopConfig, size: int, progress: bool = False) -> Scores:
    """Zero-shot CLIP scoring with the learned anchors: {split: {category: (ids, image [N], maps [N, S, S])}}.

    `anchors[category]` is a [2, E] tensor (from `load_prompt_clip`) or a trained PromptLearner."""
    plain = {c: (a.anchors if isinstance(a, PromptLearner) else a).detach() for c, a in anchors.items()}
    return clip_anchor_scores(store, rows, plain, cfg.sigma, cfg.image_weight, cfg.temperature, size)


def save_prompt_clip(path: str | Path, learner: PromptLearner, arch: str, cfg: CoopConfig | None = None,
                     **extra: Any) -> None:
    """Checkpoint {ctx [n_ctx, W] or [2, n_ctx, W], anchors [2, E]} of kind "prompt_clip" (arch = CLIP name)."""
    state = {"ctx": learner.ctx.detach().cpu(), "anchors": learner.anchors.detach().cpu()}
    save_checkpoint(path, KIND, arch, state, category=learner.category, n_ctx=learner.n_ctx,
                    class_specific=learner.class_specific, prompts=list(learner.texts),
                    config=asdict(cfg) if cfg is not None else None, **extra)


def load_prompt_clip(path: str | Path, arch: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """-> (anchors [2, E], checkpoint dict). To rebuild a learner: `PromptLearner(clip, obj["category"],
    obj["n_ctx"], obj["class_specific"])` then `learner.ctx.data.copy_(obj["state_dict"]["ctx"])`."""
    obj = load_checkpoint(path, KIND, arch)
    anchors = obj["state_dict"].get("anchors")
    if anchors is None or anchors.dim() != 2 or anchors.shape[0] != 2:
        raise WeightsError(f"{path}: prompt_clip checkpoint without anchors [2, E]; re-train it")
    return anchors, obj


def coop_histories(report: dict[str, dict[str, Any]]) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """The CoOp report (stages/train_prompts.py `prompt_clip.json`: {category: {"history": {"loss": [...],
    "criterion_value": [...], "criterion": name, "best_epoch", "best_value", ...}}}) -> ({category: per-epoch
    rows `{"epoch": 1.., "loss", <criterion name>}`}, summary {category/best_epoch, category/best_value})."""
    rows, summary = {}, {}
    for cat, entry in report.items():
        h = entry["history"]
        crit = str(h.get("criterion", "criterion_value"))
        series = {"loss": h.get("loss") or [], crit: h.get("criterion_value") or []}
        n = max(len(v) for v in series.values())
        rows[cat] = [{"epoch": e + 1, **{k: v[e] for k, v in series.items() if e < len(v)}} for e in range(n)]
        for key in ("best_epoch", "best_value"):
            if isinstance(h.get(key), (int, float)):
                summary[f"{cat}/{key}"] = h[key]
    return rows, summary
