"""Visual prompt tuning for patch kNN (method `vpt_knn`).

`num_prompts` learnable prompt tokens [P, D] modulate the cached patch descriptors [N, h, w, D] of the kNN
branch (`knn.branch`: CNN maps or CLIP tokens) through attention:

    attn = softmax(patches @ prompts^T / sqrt(D))   # [N, h, w, P]
    out  = patches + scale * (attn @ prompts)         # [N, h, w, D]

with `scale` fixed (`prompt_scale`, 0.01) or learnable per dimension (`learnable_scale`, initialised to
`prompt_scale`). The backbone is untouched; scoring is the usual patch kNN on modulated descriptors
(`anomaly_core.kit.knn.knn_scores(..., transform=model.transform)`, see methods/vpt_knn/__init__.py), memory
bank included. Prompts are initialised from
`num_prompts` seeded k-shot normal patch descriptors, so they live at the descriptors' scale and the
attention is informative from the first step.

Losses act on image-level embeddings = the mean over the grid of the modulated patches [N, D] (cosine
similarities):
* separability: -(mu_nn - mu_nd) / (sigma_nn + sigma_nd), mu/sigma the mean / population std of the
  normal-normal similarities over unordered pairs i < j (self-pairs excluded) and of all normal-defect
  similarities;
* contrastive: (1 - mean nn similarity, self-pairs excluded) + relu(mean nd similarity - margin).

Data (never test): normals = the k shots; defects = up to `num_defect_samples` seeded val anomalies.
Checkpoint selection: `split_holdout` first holds out round(holdout_fraction * n) of the n >= 2 val anomalies
(at least 1), and the val normals (>= 2 needed for normal pairs; else a share of the shots); the defect
samples are drawn from the remaining val anomalies. After every epoch the separability of held-out normals
vs held-out anomalies is measured, and the prompts with the best value (the initial prompts included, as
epoch 0) are kept. Without a possible holdout the training separability (all shots vs the training defects)
selects the checkpoint; `history["criterion"]` says which. Adam with a cosine schedule down to `min_lr`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from anomaly_core.config import Checks
from anomaly_core.data.holdout import split_holdout
from anomaly_core.data.manifest import Row, categories, stable_rng
from anomaly_core.errors import WeightsError
from anomaly_core.io import load_checkpoint, save_checkpoint
from anomaly_core.kit.patches import patch_grid
from anomaly_core.kit.scores import category_seed
from anomaly_core.store import FeatureStore

__all__ = ["VptConfig", "PromptModulator", "similarity_stats", "separability_loss", "contrastive_loss",
           "image_embeddings", "fit_vpt", "train_vpt", "train_categories", "save_vpt", "load_vpt", "KIND"]

KIND = "vpt_knn"


@dataclass
class VptConfig:
    num_prompts: int = 10
    num_defect_samples: int = 10   # val anomalies used as training defects (after the holdout is removed)
    epochs: int = 100
    lr: float = 1e-3               # Adam, cosine-annealed to min_lr over all steps
    batch_size: int = 16           # normal images per step (all training defects join every step)
    loss: Literal["separability", "contrastive"] = "separability"
    margin: float = 0.5            # contrastive margin on the mean normal-defect similarity
    prompt_scale: float = 0.01
    learnable_scale: bool = False  # per-dimension scale [D] initialised to prompt_scale
    k_neighbors: int = 1           # kNN neighbours at scoring (overrides knn.k)
    seed: int = 0
    min_lr: float = 1e-5
    holdout_fraction: float = 0.25  # share of the val anomalies held out for checkpoint selection

    def validate(self, section: str) -> None:
        Checks(section).positive(num_prompts=self.num_prompts, num_defect_samples=self.num_defect_samples,
                                 epochs=self.epochs, lr=self.lr, k_neighbors=self.k_neighbors,
                                 prompt_scale=self.prompt_scale, min_lr=self.min_lr) \
            .that(self.batch_size >= 2, "batch_size", self.batch_size, "needs >= 2 normal images per step") \
            .non_negative(margin=self.margin).fraction(holdout_fraction=self.holdout_fraction).done()


# ---------------------------------------------------------------------------- model


class PromptModulator(nn.Module):
    """Prompt tokens [P, D] and a scale (scalar buffer, or a [D] parameter when learnable)."""

    def __init__(self, prompts: torch.Tensor, prompt_scale: float = 0.01, learnable_scale: bool = False):
        super().__init__()
        self.prompts = nn.Parameter(prompts.detach().float().clone())  # [P, D]
        dim = self.prompts.shape[1]
        self.learnable_scale = learnable_scale
        if learnable_scale:
            self.scale = nn.Parameter(torch.full((dim,), float(prompt_scale)))  # [D]
        else:
            self.register_buffer("scale", torch.tensor(float(prompt_scale)))  # []

    @property
    def dim(self) -> int:
        return self.prompts.shape[1]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [..., D] -> modulated [..., D]; scale 0 returns the input values unchanged."""
        attn = (patches @ self.prompts.T / math.sqrt(self.dim)).softmax(-1)  # [..., P]
        return patches + self.scale * (attn @ self.prompts)

    @torch.no_grad()
    def transform(self, patches: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Inference for `methods.knn.knn_scores(..., transform=...)`: [N, h, w, D] -> [N, h, w, D], in image chunks."""
        return torch.cat([self(patches[i:i + chunk].float()) for i in range(0, patches.shape[0], chunk)])


def image_embeddings(model: PromptModulator, grids: torch.Tensor) -> torch.Tensor:
    """[N, h, w, D] -> mean-pooled modulated patches [N, D]."""
    return model(grids).mean(dim=(1, 2))


# ---------------------------------------------------------------------------- losses


def similarity_stats(normal: torch.Tensor, defect: torch.Tensor, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """normal [A, D] (A >= 2), defect [B, D] -> {mu_nn, sigma_nn, mu_nd, sigma_nd, separability} (0-dim).

    Cosine similarities; normal-normal over the A(A-1)/2 pairs i < j (no self-pairs); population stds;
    separability = (mu_nn - mu_nd) / (sigma_nn + sigma_nd + eps).
    """
    if normal.shape[0] < 2 or defect.shape[0] < 1:
        raise ValueError(f"similarity_stats needs >= 2 normal and >= 1 defect embeddings, got "
                         f"{normal.shape[0]} and {defect.shape[0]}")
    n, d = F.normalize(normal.float(), dim=-1), F.normalize(defect.float(), dim=-1)
    i, j = torch.triu_indices(n.shape[0], n.shape[0], offset=1)
    s_nn = (n[i] * n[j]).sum(-1)  # [A(A-1)/2]
    s_nd = (n @ d.T).flatten()  # [A B]
    stats = {"mu_nn": s_nn.mean(), "sigma_nn": s_nn.std(correction=0),
             "mu_nd": s_nd.mean(), "sigma_nd": s_nd.std(correction=0)}
    stats["separability"] = (stats["mu_nn"] - stats["mu_nd"]) / (stats["sigma_nn"] + stats["sigma_nd"] + eps)
    return stats


def separability_loss(normal_emb: torch.Tensor, defect_emb: torch.Tensor) -> torch.Tensor:
    """-((mu_nn - mu_nd) / (sigma_nn + sigma_nd)): lower when normals are tighter / further from defects."""
    return -similarity_stats(normal_emb, defect_emb)["separability"]


def contrastive_loss(normal_emb: torch.Tensor, defect_emb: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """(1 - mean normal-normal cosine, self-pairs excluded) + relu(mean normal-defect cosine - margin)."""
    s = similarity_stats(normal_emb, defect_emb)
    return (1.0 - s["mu_nn"]) + F.relu(s["mu_nd"] - margin)


def _loss(cfg: VptConfig, normal: torch.Tensor, defect: torch.Tensor) -> torch.Tensor:
    if cfg.loss == "separability":
        return separability_loss(normal, defect)
    return contrastive_loss(normal, defect, cfg.margin)


# ---------------------------------------------------------------------------- training


def _batches(n: int, size: int, g: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches of `size`; a trailing batch of 1 joins the previous one (pairs need >= 2)."""
    parts = list(torch.randperm(n, generator=g).split(size))
    if len(parts) > 1 and parts[-1].numel() < 2:
        parts[-2] = torch.cat([parts[-2], parts.pop()])
    return parts


@torch.no_grad()
def _stats(model: PromptModulator, normal: torch.Tensor, defect: torch.Tensor) -> dict[str, float]:
    s = similarity_stats(image_embeddings(model, normal), image_embeddings(model, defect))
    return {k: float(v) for k, v in s.items()}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit_vpt(model: PromptModulator, normal: torch.Tensor, defect: torch.Tensor,
            holdout: tuple[torch.Tensor, torch.Tensor] | None, cfg: VptConfig, seed: int = 0,
            progress: bool = False, desc: str = KIND) -> dict[str, Any]:
    """Train on normal grids [Nn, h, w, D] (Nn >= 2) and defect grids [Nd, h, w, D]; keep the best prompts.

    holdout = (normal grids [>= 2, ...], defect grids [>= 1, ...]) or None. Returns the history
    {loss, separability, mu_nn, mu_nd, lr, holdout_separability (per epoch), initial, criterion,
    best_epoch (0 = initial prompts), best_separability}; the model holds the best state on return."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps = cfg.epochs * len(_batches(normal.shape[0], cfg.batch_size, torch.Generator().manual_seed(0)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=cfg.min_lr)
    criterion = "holdout_separability" if holdout is not None else "train_separability"
    history: dict[str, Any] = {k: [] for k in ("loss", "separability", "mu_nn", "mu_nd", "lr",
                                                "holdout_separability")}

    holdout_value = lambda: _stats(model, *holdout)["separability"]
    initial = _stats(model, normal, defect)
    best = holdout_value() if holdout is not None else initial["separability"]
    history["initial"] = {**initial, "holdout_separability": best if holdout is not None else None}
    best_epoch, best_state = 0, _snapshot(model)
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=desc, leave=False, disable=not progress):
        total, n_steps = 0.0, 0
        for idx in _batches(normal.shape[0], cfg.batch_size, g):
            loss = _loss(cfg, image_embeddings(model, normal[idx]), image_embeddings(model, defect))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, n_steps = total + float(loss.detach()), n_steps + 1
        st = _stats(model, normal, defect)
        history["loss"].append(total / n_steps)
        for k in ("separability", "mu_nn", "mu_nd"):
            history[k].append(st[k])
        history["lr"].append(opt.param_groups[0]["lr"])
        value = st["separability"]
        if holdout is not None:
            value = holdout_value()
            history["holdout_separability"].append(value)
        if value > best:
            best, best_epoch, best_state = value, epoch, _snapshot(model)
    model.load_state_dict(best_state)
    history.update(criterion=criterion, best_epoch=best_epoch, best_separability=best)
    return history


def _init_prompts(normal: torch.Tensor, num_prompts: int, seed: int) -> torch.Tensor:
    """num_prompts seeded patch descriptors of the normal grids [N, h, w, D] -> [P, D]."""
    flat = normal.reshape(-1, normal.shape[-1])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(flat.shape[0], generator=g)[:num_prompts]
    if idx.numel() < num_prompts:  # fewer patches than prompts: repeat
        idx = idx[torch.arange(num_prompts) % idx.numel()]
    return flat[idx].float().clone()


Grids = Callable[[Sequence[Row]], torch.Tensor]  # rows -> patch grids [M, h, w, D] (M = N, or N * T tiles)


def train_vpt(store: FeatureStore, rows: Sequence[Row], cfg: VptConfig, branch: str, aggregate: int,
              pad: str = "zeros", progress: bool = False) -> tuple[dict[str, PromptModulator], dict[str, dict]]:
    """One PromptModulator per category on the patch grids of the kNN branch (`knn.branch`, `knn.patch_aggregate`,
    `knn.patch_pad`).

    Returns ({category: model}, {category: history + "split"}). A category with < 2 shots or no val
    anomaly keeps its initial prompts (history["note"] says why)."""
    grid = lambda part: patch_grid(store, branch, part, aggregate, pad)  # [N, h, w, D]
    return train_categories(rows, cfg, lambda cat: (grid, grid), progress)


def train_categories(rows: Sequence[Row], cfg: VptConfig, grids: Callable[[str], tuple[Grids, Grids]],
                     progress: bool = False) -> tuple[dict[str, PromptModulator], dict[str, dict]]:
    """`train_vpt` on any grids: `grids(category)` -> (normal rows -> grids, defect rows -> grids); the items of
    the grids (images, or tiles: methods/vpt_knn/tiled.py) are what the batches and the embeddings are made of."""
    models, report = {}, {}
    for cat in categories(rows):
        seed = category_seed(cfg.seed, KIND, cat)
        split = split_holdout(rows, cat, cfg.seed, KIND, cfg.holdout_fraction, True, min_normals=2)
        pool = split.train_anomalous
        order = stable_rng(cfg.seed, f"{KIND}/defects/{cat}").permutation(len(pool))[:cfg.num_defect_samples]
        defects = [pool[i] for i in sorted(order.tolist())]
        grid, defect_grid = grids(cat)
        normal = grid(split.train_normal)
        model = PromptModulator(_init_prompts(normal, cfg.num_prompts, seed), cfg.prompt_scale, cfg.learnable_scale)
        info = {"split": {**split.counts(), "defect_samples": len(defects)}}
        if normal.shape[0] < 2 or not defects:
            report[cat] = {**info, "note": "fewer than 2 shots or no val anomaly: prompts left at initialisation"}
        else:
            holdout = ((grid(split.holdout_normal), defect_grid(split.holdout_anomalous)) if split.has_holdout
                       else None)
            report[cat] = {**info, **fit_vpt(model, normal, defect_grid(defects), holdout, cfg, seed, progress,
                                             f"{KIND}/{cat}")}
        models[cat] = model
    return models, report


# ---------------------------------------------------------------------------- checkpoints


def save_vpt(path: str | Path, model: PromptModulator, arch: str, cfg: VptConfig | None = None,
             history: dict | None = None, **extra: Any) -> None:
    """Checkpoint {prompts [P, D], scale [] or [D]} of kind "vpt_knn" (arch = the kNN branch backbone name)."""
    state = {"prompts": model.prompts.detach().cpu(), "scale": model.scale.detach().cpu()}
    save_checkpoint(path, KIND, arch, state, learnable_scale=model.learnable_scale,
                    config=asdict(cfg) if cfg is not None else None, history=history, **extra)


def load_vpt(path: str | Path, arch: str | None = None) -> tuple[PromptModulator, dict[str, Any]]:
    """-> (PromptModulator, checkpoint dict)."""
    obj = load_checkpoint(path, KIND, arch)
    state = obj["state_dict"]
    if "prompts" not in state or "scale" not in state:
        raise WeightsError(f"{path}: vpt_knn checkpoint lacks prompts / scale; re-train it")
    learnable = bool(obj.get("learnable_scale", state["scale"].dim() == 1))
    model = PromptModulator(state["prompts"], 0.0, learnable)
    with torch.no_grad():
        model.scale.copy_(state["scale"])
    return model, obj


def history_records(report: Mapping[str, Any]) -> list[dict[str, float]]:
    """Per-epoch training history as records for a DVC plot: [{epoch, loss, separability, mu_nn, mu_nd}]."""
    keys = [k for k in ("loss", "separability", "mu_nn", "mu_nd", "holdout_separability") if report.get(k)]
    n = len(report.get("loss") or [])
    return [{"epoch": i + 1, **{k: float(report[k][i]) for k in keys if i < len(report[k])}} for i in range(n)]
