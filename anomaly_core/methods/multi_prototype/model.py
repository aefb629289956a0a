"""Multi-prototype CLIP anomaly detection (method `multi_prototype`).

Instead of one averaged normal and one abnormal text anchor, each category gets `n_pro` normal and
`n_pro_ab` abnormal learnable prototypes in the CLIP joint embedding space:

* initialisation: spherical k-means (seeded k-means++) of the normalised prompt-ensemble text
  embeddings (normal prompts -> K normal prototypes, abnormal prompts -> M abnormal prototypes), plus
  tiny seeded Gaussian noise so prototypes that start from the same cluster can move apart;
* score: `softmax([max_k cos(x, N_k), max_m cos(x, A_m)] / temperature)[abnormal]`, for every patch token of
  every cached CLIP level (maps averaged over levels) and for the global image embedding;
* training (Adam, lr 0.002) on cached features only: the k-shot normal patch tokens and globals are
  normal; when `use_val_anomalies`, the `val` anomalous images give abnormal patches (grid cells whose
  mask coverage is >= `min_coverage`), abnormal globals, and extra normal patches (cells with zero mask
  coverage). Test images are never read. The loss is class-balanced cross-entropy on the patch logits
  plus the same on the image (global) logits. Prototypes are shared by all CLIP levels.

Because the val anomalies are training data here, this method's *val* metrics are optimistic; compare
methods on test.

The CLIP training-data helpers it shares with CoOp live in `anomaly_core/kit/clip_data.py`.
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
from anomaly_core.data.holdout import HoldoutSplit, shot_rows, split_holdout, val_anomalies
from anomaly_core.data.manifest import Row, categories
from anomaly_core.errors import WeightsError
from anomaly_core.io import load_checkpoint, save_checkpoint
from anomaly_core.kit.clip_data import ClipTrainData, clip_train_data, grid_coverage, resample
from anomaly_core.kit.losses import balanced_ce
from anomaly_core.kit.maps import mix_image_score, to_image_maps
from anomaly_core.kit.patches import clip_grid
from anomaly_core.kit.scores import Scores, category_seed, score_splits
from anomaly_core.store import FeatureStore

__all__ = [
    "MultiProtoConfig", "MultiPrototype", "ClipTrainData", "clip_grid", "grid_coverage", "clip_train_data",
    "val_anomalies", "spherical_kmeans", "init_prototypes", "prompt_embeddings", "balanced_ce",
    "multi_proto_loss", "fit_multi_prototype", "usage_range", "prototype_diagnostics", "prototype_maps",
    "train_multi_prototype", "score_multi_prototype", "save_multi_prototype", "load_multi_prototype",
    "category_seed", "resample", "HoldoutSplit", "split_holdout", "KIND",
]

KIND = "multi_prototype"


@dataclass
class MultiProtoConfig:
    n_pro: int = 3                 # normal prototypes K
    n_pro_ab: int = 6              # abnormal prototypes M
    epochs: int = 100              # passes over the normal patch tokens
    lr: float = 0.002              # Adam
    temperature: float = 0.07      # softmax temperature of the 2-way (normal, abnormal) logits
    use_val_anomalies: bool = True  # train on val anomalies (patches inside masks, globals) when present
    holdout_fraction: float = 0.25  # share of val anomalies never trained on (kept for the fusion's choice)
    seed: int = 0
    batch_size: int = 8192         # normal patch tokens per step (abnormal ones are resampled to match)
    min_coverage: float = 0.5      # a grid cell is an abnormal patch when >= this share of it is masked
    init_noise: float = 1e-3       # std of the seeded noise added to the k-means initialisation
    sigma: float = 4.0             # Gaussian smoothing of the maps (pixels)
    image_weight: float = 0.5      # image score = w * p(abnormal | global) + (1 - w) * max(map)

    def validate(self, section: str) -> None:
        Checks(section).positive(n_pro=self.n_pro, n_pro_ab=self.n_pro_ab, epochs=self.epochs, lr=self.lr,
                                 temperature=self.temperature, batch_size=self.batch_size) \
            .open_unit(min_coverage=self.min_coverage).unit(image_weight=self.image_weight) \
            .fraction(holdout_fraction=self.holdout_fraction).non_negative(init_noise=self.init_noise, sigma=self.sigma) \
            .done()


# ---------------------------------------------------------------------------- initialisation


def spherical_kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 25) -> torch.Tensor:
    """Cosine k-means with seeded k-means++ initialisation: x [P, E] -> unit centres [k, E].

    With k >= P every point becomes a centre (cycled when k > P; the caller's noise separates duplicates).
    """
    x = F.normalize(x.float(), dim=-1)
    p = x.shape[0]
    if k >= p:
        return x[torch.arange(k) % p].clone()
    g = torch.Generator().manual_seed(seed)
    idx = [int(torch.randint(p, (1,), generator=g))]
    for _ in range(k - 1):
        dist = (1.0 - (x @ x[idx].T).max(1).values).clamp_min(0)  # [P]
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full((p,), 1.0 / p)
        idx.append(int(torch.multinomial(probs, 1, generator=g)))
    centres = x[idx].clone()  # [k, E]
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)  # [P]
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = torch.bincount(assign, minlength=k) > 0
        centres = torch.where(filled[:, None], F.normalize(sums, dim=-1), centres)
    return centres


def init_prototypes(text_emb: torch.Tensor, k: int, seed: int = 0, noise: float = 1e-3) -> torch.Tensor:
    """Prompt embeddings [P, E] -> k unit prototypes [k, E]: k-means centres + N(0, noise^2) seeded noise."""
    centres = spherical_kmeans(text_emb, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return F.normalize(centres + noise * torch.randn(centres.shape, generator=g), dim=-1)


@torch.no_grad()
def prompt_embeddings(clip, category: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised text embeddings of the prompt ensemble: (normal [Pn, E], abnormal [Pa, E])."""
    from anomaly_core.kit.prompts import build_prompts

    normal, abnormal = build_prompts(category)
    enc = lambda texts: F.normalize(clip.encode_text(clip.tokenize(texts)).float(), dim=-1)
    return enc(normal), enc(abnormal)


# ---------------------------------------------------------------------------- model


class MultiPrototype(nn.Module):
    """K normal and M abnormal prototypes (stored unnormalised, used as unit vectors)."""

    def __init__(self, normal: torch.Tensor, abnormal: torch.Tensor, temperature: float = 0.07):
        super().__init__()
        if normal.dim() != 2 or abnormal.dim() != 2 or normal.shape[1] != abnormal.shape[1]:
            raise ValueError(f"prototypes must be [K, dim] and [M, dim], got {tuple(normal.shape)} and "
                             f"{tuple(abnormal.shape)}")
        self.normal_prototypes = nn.Parameter(normal.detach().float().clone())  # [K, E]
        self.abnormal_prototypes = nn.Parameter(abnormal.detach().float().clone())  # [M, E]
        self.temperature = float(temperature)

    @property
    def dim(self) -> int:
        return self.normal_prototypes.shape[1]

    def similarities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., E] -> cosine similarities (to normal [..., K], to abnormal [..., M])."""
        x = F.normalize(x.float(), dim=-1)
        return (x @ F.normalize(self.normal_prototypes, dim=-1).T,
                x @ F.normalize(self.abnormal_prototypes, dim=-1).T)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., E] -> [..., 2] = (max normal similarity, max abnormal similarity) / temperature."""
        s_n, s_a = self.similarities(x)
        return torch.stack([s_n.max(-1).values, s_a.max(-1).values], dim=-1) / self.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., E] -> abnormal probability [...]."""
        return self.logits(x).softmax(-1)[..., 1]


# ---------------------------------------------------------------------------- training


def multi_proto_loss(model: MultiPrototype, normal: torch.Tensor, abnormal: torch.Tensor,
                     normal_glob: torch.Tensor, abnormal_glob: torch.Tensor) -> torch.Tensor:
    """Patch-level balanced CE + image-level balanced CE (the image term is skipped without globals).

    normal [Bn, E], abnormal [Ba, E] patch tokens; normal_glob [Gn, E], abnormal_glob [Ga, E].
    """
    loss = balanced_ce(model.logits(normal), model.logits(abnormal))
    if normal_glob.shape[0] + abnormal_glob.shape[0]:
        loss = loss + balanced_ce(model.logits(normal_glob), model.logits(abnormal_glob))
    return loss


def fit_multi_prototype(model: MultiPrototype, data: ClipTrainData, cfg: MultiProtoConfig, seed: int = 0,
                        progress: bool = False, desc: str = KIND) -> dict[str, list[float]]:
    """Adam on the prototypes; one epoch = one pass over the normal patches in `cfg.batch_size` batches,
    each paired with as many abnormal patches (resampled) and all globals. Returns {"loss": [per epoch]}."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: dict[str, list[float]] = {"loss": []}
    n = data.normal_patches.shape[0]
    for _ in tqdm(range(cfg.epochs), desc=desc, leave=False, disable=not progress):
        perm, total, steps = torch.randperm(n, generator=g), 0.0, 0
        for start in range(0, n, cfg.batch_size):
            normal = data.normal_patches[perm[start:start + cfg.batch_size]]
            abnormal = resample(data.abnormal_patches, normal.shape[0], g)
            loss = multi_proto_loss(model, normal, abnormal, data.normal_globals, data.abnormal_globals)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        history["loss"].append(total / max(steps, 1))
    return history


# ---------------------------------------------------------------------------- diagnostics


def usage_range(k: int) -> tuple[float, float]:
    """Healthy share of normal patches per normal prototype: [0.6/K, 1.2/K].

    The seed's 20-40 % for K = 3 is 0.6x to 1.2x the uniform share 1/K; the same factors scale it to any K
    (K = 5: 12-24 %; K = 1: 60-120 %, i.e. always healthy).
    """
    return 0.6 / k, 1.2 / k


def _mean_offdiag(sim: torch.Tensor) -> float | None:
    """Mean of the off-diagonal entries of a square [M, M] matrix; None when M < 2."""
    m = sim.shape[0]
    if m < 2:
        return None
    return float((sim.sum() - sim.diagonal().sum()) / (m * (m - 1)))


@torch.no_grad()
def prototype_diagnostics(model: MultiPrototype, normal_patches: torch.Tensor, collapse_max: float = 0.5,
                          separation_max: float = 0.3) -> dict[str, Any]:
    """Health of a trained model (thresholds from the multi-prototype guide).

    normal_patches [P, E]: normal patch tokens (the k shots). Returns a JSON-able dict:
    `normal_usage` (share of patches whose nearest normal prototype is k), `usage_range`, `usage_ok`;
    `abnormal_collapse` (mean pairwise cosine among abnormal prototypes, None if M = 1), `collapse_ok` (< 0.5);
    `separation` (mean normal-abnormal prototype cosine), `separation_ok` (< 0.3); `healthy`; `flags`.
    """
    n = F.normalize(model.normal_prototypes.float(), dim=-1)  # [K, E]
    a = F.normalize(model.abnormal_prototypes.float(), dim=-1)  # [M, E]
    k = n.shape[0]
    nearest = (F.normalize(normal_patches.float(), dim=-1) @ n.T).argmax(1)  # [P]
    usage = (torch.bincount(nearest, minlength=k).float() / max(nearest.numel(), 1)).tolist()
    lo, hi = usage_range(k)
    collapse = _mean_offdiag(a @ a.T)
    separation = float((n @ a.T).mean())
    flags = []
    usage_ok = all(lo - 1e-9 <= u <= hi + 1e-9 for u in usage)
    if not usage_ok:
        flags.append(f"unbalanced normal prototype usage {[round(u, 3) for u in usage]} "
                     f"(healthy {lo:.0%}-{hi:.0%} each for K={k})")
    collapse_ok = collapse is None or collapse < collapse_max
    if not collapse_ok:
        flags.append(f"abnormal prototypes collapsed: mean pairwise cosine {collapse:.3f} >= {collapse_max}")
    separation_ok = separation < separation_max
    if not separation_ok:
        flags.append(f"weak normal-abnormal separation: mean cosine {separation:.3f} >= {separation_max}")
    return {"normal_usage": usage, "usage_range": [lo, hi], "usage_ok": usage_ok,
            "abnormal_collapse": collapse, "collapse_ok": collapse_ok,
            "separation": separation, "separation_ok": separation_ok,
            "healthy": usage_ok and collapse_ok and separation_ok, "flags": flags}


# ---------------------------------------------------------------------------- stage entry points


def train_multi_prototype(store: FeatureStore, rows: Sequence[Row], clip, cfg: MultiProtoConfig, size: int,
                          progress: bool = False) -> tuple[dict[str, MultiPrototype], dict[str, dict]]:
    """Train one model per category from cached CLIP features (`clip` only encodes the prompt ensemble).

    Returns ({category: model}, {category: {"history", "diagnostics", "data"}}).
    """
    models, report = {}, {}
    for cat in categories(rows):
        seed = category_seed(cfg.seed, KIND, cat)
        split = split_holdout(rows, cat, cfg.seed, KIND, cfg.holdout_fraction)
        anomalous = split.train_anomalous if cfg.use_val_anomalies else []
        data = clip_train_data(store, shot_rows(rows, cat), anomalous, size, cfg.min_coverage)
        text_n, text_a = prompt_embeddings(clip, cat)
        model = MultiPrototype(init_prototypes(text_n, cfg.n_pro, seed, cfg.init_noise),
                               init_prototypes(text_a, cfg.n_pro_ab, seed + 2, cfg.init_noise), cfg.temperature)
        history = fit_multi_prototype(model, data, cfg, seed, progress, f"{KIND}/{cat}")
        diag = prototype_diagnostics(model, data.normal_patches[:data.n_shot_patches])
        models[cat] = model
        report[cat] = {"history": history, "diagnostics": diag, "data": data.counts()}
    return models, report


@torch.no_grad()
def prototype_maps(model: MultiPrototype, levels: list[torch.Tensor], global_emb: torch.Tensor, grid: int,
                   size: int, sigma: float, image_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """levels [N, L, E] each, global_emb [N, E] -> (image scores [N], maps [N, size, size]).

    Per-level abnormal-probability maps are averaged, upsampled and smoothed; the image score is
    `image_weight * p(abnormal | global) + (1 - image_weight) * max(map)` as in zero-shot CLIP.
    """
    n = global_emb.shape[0]
    per_level = [model(t).reshape(n, grid, grid) for t in levels]
    maps = to_image_maps(torch.stack(per_level).mean(0), size, sigma)
    return mix_image_score(model(global_emb), maps, image_weight), maps


def score_multi_prototype(store: FeatureStore, rows: Sequence[Row], models: dict[str, MultiPrototype],
                          cfg: MultiProtoConfig, size: int, progress: bool = False) -> Scores:
    """Scores {split: {category: (ids, image [N], maps [N, size, size])}} for val and test."""
    grid = clip_grid(store)

    def part(cat: str, rows_: list[Row]):
        feats = store.get("clip", rows_)
        return prototype_maps(models[cat], store.levels(feats), feats["global"], grid, size, cfg.sigma,
                              cfg.image_weight)

    return score_splits(rows, part)


# ---------------------------------------------------------------------------- checkpoints


def save_multi_prototype(path: str | Path, model: MultiPrototype, arch: str, cfg: MultiProtoConfig | None = None,
                         **extra: Any) -> None:
    """Checkpoint {normal_prototypes [K, dim], abnormal_prototypes [M, dim]} (kind "multi_prototype",
    arch = the CLIP model name) with the temperature, the config and any `extra` JSON-able values."""
    state = {"normal_prototypes": model.normal_prototypes.detach().cpu(),
             "abnormal_prototypes": model.abnormal_prototypes.detach().cpu()}
    save_checkpoint(path, KIND, arch, state, temperature=model.temperature,
                    config=asdict(cfg) if cfg is not None else None, **extra)


def _refuse_single_anchor(path: Path) -> None:
    """Raise WeightsError for the old baseline layout ({text_features [2, dim], feature_gallery*}, no schema)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects other than tensors / containers
        raise WeightsError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or "schema" in obj:
        return
    inner = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else {}
    tf = obj.get("text_features", inner.get("text_features"))
    if tf is not None:
        shape = list(tf.shape) if hasattr(tf, "shape") else "?"
        raise WeightsError(
            f"{path}: this is the old single-anchor checkpoint layout (text_features {shape}: one averaged normal "
            f"and one abnormal anchor), not multi-prototype (normal_prototypes [K, dim], abnormal_prototypes "
            f"[M, dim]); it cannot be converted and must be re-trained with the multi-prototype code "
            f"(method {KIND})")


def load_multi_prototype(path: str | Path, arch: str | None = None) -> tuple[MultiPrototype, dict[str, Any]]:
    """Load a `save_multi_prototype` checkpoint -> (model, checkpoint dict).

    Raises WeightsError for a missing file, another kind / schema / architecture, or the old single-anchor
    `text_features [2, dim]` layout (which must be re-trained)."""
    path = Path(path)
    if path.is_file():
        _refuse_single_anchor(path)
    obj = load_checkpoint(path, KIND, arch)
    state = obj["state_dict"]
    missing = [k for k in ("normal_prototypes", "abnormal_prototypes") if k not in state]
    if missing:
        raise WeightsError(f"{path}: multi_prototype checkpoint lacks {missing}; re-train it")
    try:
        model = MultiPrototype(state["normal_prototypes"], state["abnormal_prototypes"],
                               obj.get("temperature", 0.07))
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    return model, obj
