"""AA-CLIP training: stage 1 (text adapters on cached frozen image tokens) and stage 2 (image adapters
with the stage-1 anchors frozen), with validation-based checkpoint selection in stage 2."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import kornia
import torch
from torch import nn
from tqdm.auto import tqdm

from anomaly_core.distributed import all_reduce_sum
from anomaly_core.distributed import rank as dist_rank
from anomaly_core.distributed import world_size as dist_world
from anomaly_core.errors import DataError
from anomaly_core.methods.aaclip.core import (
    LOGIT_SCALE,
    ImageAdapterConfig,
    TextAdapterConfig,
    check_image_size,
    class_anchors,
    image_stage_loss,
    stack_anchors,
    test_map,
    text_stage_loss,
)
from anomaly_core.methods.aaclip.dpam import dpam_blocks, dpam_levels
from anomaly_core.methods.aaclip.modules import ImageAdapters, TextAdapters

__all__ = ["train_text_adapters", "train_image_adapters", "augment_batch", "evaluate_image_adapters"]

BETAS = (0.5, 0.999)
ROTATION_DEGREES = 5.0  # AA-CLIP: RandomRotation(5)
JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=0.7)  # AA-CLIP stage-2 ColorJitter
MAX_AUROC_PIXELS = 200_000
EVAL_BATCH = 8

ImageSet = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[str]]  # images, masks, labels, class names


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _batches(n: int, size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches of a (shuffled when gen is given) permutation of range(n)."""
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(size))


# ============================================================================================ stage 1
def _check_text_data(data: Sequence[dict[str, Any]], backbone, cfg: TextAdapterConfig) -> int:
    """Validate the cached-feature list (and, with cfg.dpam, the images); returns the number of levels."""
    if not data or not sum(len(d["masks"]) for d in data):
        raise DataError("AA-CLIP text stage: no training images")
    if cfg.dpam:
        dpam_blocks(backbone.depth, cfg.dpam_layer)
    n_levels = len(data[0]["levels"])
    for d in data:
        name, n = d["class_name"], len(d["masks"])
        size = (n, backbone.image_size, backbone.image_size, 3)
        if cfg.dpam and (d.get("images") is None or tuple(d["images"].shape) != size):
            got = None if d.get("images") is None else tuple(d["images"].shape)
            raise DataError(f"AA-CLIP text stage (aaclip_text.dpam): category {name} needs its images uint8 {size}, "
                            f"got {got}")
        if len(d["levels"]) != n_levels or not n_levels:
            raise DataError(f"AA-CLIP text stage: category {name} has {len(d['levels'])} levels, expected {n_levels}")
        for t in [*d["levels"], d["global"]]:
            if t.shape[0] != n or t.shape[-1] != backbone.embed_dim:
                raise DataError(f"AA-CLIP text stage: category {name}: cached tensor {tuple(t.shape)} does not match "
                                f"{n} masks / embed dim {backbone.embed_dim} (re-run the features stage)")
        if d["levels"][0].shape[1] != backbone.grid ** 2:
            raise DataError(f"AA-CLIP text stage: category {name}: {d['levels'][0].shape[1]} tokens, backbone "
                            f"{backbone.name} has a {backbone.grid}x{backbone.grid} grid (re-run the features stage)")
    return n_levels


def _text_batch(data: Sequence[dict[str, Any]], items: list[tuple[int, int]], n_levels: int, backbone,
                cfg: TextAdapterConfig) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    """(category, row) pairs -> (levels n_levels x [B, L, E], global [B, E], masks [B, S, S], class names).
    Levels: the cached tokens, or with cfg.dpam the DPAM tokens of this batch's images (they depend on the batch)."""
    device = _device(backbone)

    def take(get) -> torch.Tensor:
        return torch.stack([get(data[c])[i] for c, i in items]).to(device)

    if cfg.dpam:
        from anomaly_core.backbones import preprocess

        x = preprocess(take(lambda d: d["images"]), backbone.image_size, backbone.mean, backbone.std)  # [B, 3, S, S]
        levels = dpam_levels(backbone.model.visual, x, backbone.levels, cfg.dpam_layer)
    else:
        levels = [take(lambda d, j=j: d["levels"][j]).float() for j in range(n_levels)]
    return levels, take(lambda d: d["global"]).float(), take(lambda d: d["masks"]).float(), \
        [data[c]["class_name"] for c, _ in items]


def _text_step_loss(backbone, adapters: TextAdapters, batch, cfg: TextAdapterConfig, anchors: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch; anchors of the batch's classes are recomputed through the adapters unless given
    ([C, 2, E] for the batch's unique classes, sorted)."""
    levels, glob, masks, names = batch
    uniq = sorted(set(names))
    a = class_anchors(backbone, adapters, uniq) if anchors is None else anchors  # [U, 2, E]
    per_sample = a[torch.tensor([uniq.index(c) for c in names], device=a.device)]  # [B, 2, E]
    return text_stage_loss(levels, glob, masks, per_sample.float(), backbone.grid, cfg.text_norm_weight)


@torch.no_grad()
def _text_eval_loss(backbone, adapters: TextAdapters, data, index, n_levels: int, cfg: TextAdapterConfig) -> float:
    """Mean stage-1 loss over all images with the current adapters (anchors computed once per class)."""
    names = sorted({d["class_name"] for d in data})
    anchors = dict(zip(names, class_anchors(backbone, adapters, names)))
    total = 0.0
    for idx in _batches(len(index), cfg.batch_size, None):
        batch = _text_batch(data, [index[i] for i in idx], n_levels, backbone, cfg)
        uniq = sorted(set(batch[3]))
        loss, _ = _text_step_loss(backbone, adapters, batch, cfg, torch.stack([anchors[c] for c in uniq]))
        total += float(loss) * len(idx)
    return total / len(index)


def train_text_adapters(backbone, data: Sequence[dict[str, Any]], cfg: TextAdapterConfig, progress: bool = True
                        ) -> tuple[TextAdapters, torch.Tensor, list[dict[str, Any]]]:
    """Stage 1: train text adapters so the prompt anchors segment the cached frozen image tokens.

    data: one dict per category with `levels` (list of [N, L, E] cached tokens after ln_post + proj),
    `global` [N, E], `masks` [N, S, S] float 0/1, `class_name` -> (adapters in eval mode,
    anchors [C, 2, E] for the categories in `data` order (detached), history).
    history[0] is the loss of the untrained adapters; then one entry per epoch with the mean training
    loss and its seg / orth parts. Loss = sum over ALL levels of seg_loss + text_norm_weight * orth.

    Image-level augmentation is impossible here: the image tokens are cached features, so every epoch sees
    the same tokens (AA-CLIP's stage-1 flip/rotation/crop is not reproduced).
    """
    cfg.validate("aaclip_text")
    n_levels = _check_text_data(data, backbone, cfg)
    device = _device(backbone)
    index = [(c, i) for c, d in enumerate(data) for i in range(len(d["masks"]))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        adapters = TextAdapters.for_backbone(backbone, cfg.adapt_until, cfg.adapt_weight, cfg.adapter).to(device)
        history = [{"epoch": 0, "loss": _text_eval_loss(backbone, adapters, data, index, n_levels, cfg)}]
        opt = torch.optim.Adam(adapters.parameters(), lr=cfg.lr, betas=BETAS)
        for epoch in range(1, cfg.epochs + 1):
            adapters.train()
            sums = {"loss": 0.0, "seg": 0.0, "orth": 0.0}
            batches = _batches(len(index), cfg.batch_size, gen)
            for idx in tqdm(batches, desc=f"aaclip text {epoch}/{cfg.epochs}", disable=not progress, leave=False):
                batch = _text_batch(data, [index[i] for i in idx], n_levels, backbone, cfg)
                loss, parts = _text_step_loss(backbone, adapters, batch, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in {"loss": float(loss.detach()), **parts}.items():
                    sums[k] += v * len(idx)
            history.append({"epoch": epoch, **{k: v / len(index) for k, v in sums.items()}})
        adapters.eval()
        with torch.no_grad():
            anchors = class_anchors(backbone, adapters, [d["class_name"] for d in data]).detach().cpu()
    return adapters, anchors, history


# ============================================================================================ stage 2
def _unpack(split: ImageSet, name: str) -> ImageSet:
    images, masks, labels, names = split
    n = len(images)
    if not n:
        raise DataError(f"AA-CLIP image stage: no {name} images")
    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise DataError(f"AA-CLIP image stage: {name} images must be uint8 [N, H, W, 3], got "
                        f"{images.dtype} {tuple(images.shape)}")
    if not (len(masks) == len(labels) == len(names) == n) or masks.dim() != 3:
        raise DataError(f"AA-CLIP image stage: {name} has {n} images, masks {tuple(masks.shape)}, "
                        f"{len(labels)} labels, {len(names)} class names")
    return images, masks.float(), torch.as_tensor(labels).long(), list(names)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                  gen: torch.Generator | None = None, enabled: bool = True, seeds: Sequence[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """images uint8 [B, H, W, 3], masks [B, S, S] -> (normalised [B, 3, size, size], masks [B, S, S] 0/1).

    When enabled (stage-2 augmentation, as AA-CLIP): colour jitter (brightness/contrast/saturation 0.2,
    p=0.7) on the image only, then the same random horizontal flip and rotation in [-5, 5] degrees (about
    the centre, zero fill) on image and mask. With `seeds` (one int per sample) every random draw of sample i
    comes from seeds[i] alone, so a sample is augmented the same whatever batch (or rank) it lands in; the
    training loop uses this. Without seeds, flip and angle come from `gen` and kornia's jitter from the global
    torch RNG (one jitter order per batch). The mask keeps its own resolution S (rotation is defined about the
    centre, so image and mask stay aligned whatever the sizes).
    """
    device = masks.device
    x = images.to(device).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
    if x.shape[-2:] != (size, size):
        x = kornia.geometry.transform.resize(x, (size, size), interpolation="bilinear", antialias=True)
    m = masks.float()[:, None]  # [B, 1, S, S]
    if enabled:
        b = x.shape[0]
        if seeds is not None:
            x, u_flip, u_angle = _jitter_per_sample(x, seeds)
        else:
            x = kornia.augmentation.ColorJitter(**JITTER)(x).clamp(0, 1)
            u_flip, u_angle = torch.rand(b, generator=gen), torch.rand(b, generator=gen)
        flip = (u_flip < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        m = torch.where(flip[:, None, None, None], m.flip(-1), m)
        angle = ((u_angle * 2 - 1) * ROTATION_DEGREES).to(device)
        x = kornia.geometry.transform.rotate(x, angle)
        m = (kornia.geometry.transform.rotate(m, angle) > 0.5).float()
    x = kornia.enhance.normalize(x, torch.tensor(mean, device=device), torch.tensor(std, device=device))
    return x, m[:, 0]


def _jitter_per_sample(x: torch.Tensor, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, 3, S, S] in [0, 1] -> (jittered x, flip uniforms [B], angle uniforms [B]); sample i's jitter
    (kornia, global RNG re-seeded in a fork) and uniforms depend on seeds[i] only."""
    if len(seeds) != x.shape[0]:
        raise DataError(f"augment_batch: {len(seeds)} seeds for {x.shape[0]} images")
    jitter = kornia.augmentation.ColorJitter(**JITTER)
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    out, u = [], []
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        u.append(torch.rand(2, generator=g))
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(seed))
            out.append(jitter(x[i : i + 1]).clamp(0, 1))
    u = torch.stack(u)  # [B, 2]
    return torch.cat(out), u[:, 0], u[:, 1]


def _pixel_auroc(maps: torch.Tensor, masks: torch.Tensor, seed: int) -> float | None:
    """maps, masks [N, S, S] -> pixel AUROC on a seeded subsample of at most MAX_AUROC_PIXELS pixels
    (None when the masks hold a single class)."""
    from sklearn.metrics import roc_auc_score

    y, s = (masks.reshape(-1) > 0.5), maps.reshape(-1).float()
    if y.all() or not y.any():
        return None
    if y.numel() > MAX_AUROC_PIXELS:
        pick = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))[:MAX_AUROC_PIXELS]
        if y[pick].any() and not y[pick].all():
            y, s = y[pick], s[pick]
    return float(roc_auc_score(y.numpy(), s.numpy()))


@torch.no_grad()
def evaluate_image_adapters(backbone, adapters: ImageAdapters, anchors_by_class: dict[str, torch.Tensor],
                            split: ImageSet, cfg: ImageAdapterConfig) -> dict[str, float | None]:
    """Validation of stage 2 (no augmentation): {"val_loss": mean stage-2 loss, "val_pixel_auroc": AUROC of
    the test maps against the masks, or None when the masks have no anomalous (or no normal) pixel}."""
    images, masks, labels, names = _unpack(split, "val")
    device = _device(backbone)
    adapters.eval()
    total, maps = 0.0, []
    for idx in _batches(len(images), EVAL_BATCH, None):
        x, m = augment_batch(images[idx], masks[idx].to(device), backbone.image_size, backbone.mean, backbone.std,
                             enabled=False)
        a = stack_anchors(anchors_by_class, [names[i] for i in idx]).to(device).float()
        seg, det = adapters(backbone, x)
        seg, det = [t.float() for t in seg], det.float()
        loss, _ = image_stage_loss(seg, det, a, m, labels[idx].to(device), backbone.grid, ce_scale(adapters))
        total += float(loss) * len(idx)
        maps.append(test_map(seg, a, backbone.grid, masks.shape[-1], cfg.sigma, cfg.ksize).cpu())
    return {"val_loss": total / len(images), "val_pixel_auroc": _pixel_auroc(torch.cat(maps), masks, cfg.seed)}


def ce_scale(adapters: ImageAdapters) -> float:
    """Stage-2 cross-entropy logit scale: LOGIT_SCALE, or 1 (raw cosines, as AA-CLIP) for the official style."""
    return 1.0 if adapters.style == "official" else LOGIT_SCALE


def _amp(device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context factory, GradScaler): bf16 autocast on CUDA when supported, else fp16 with a
    scaler; on CPU no autocast and a disabled scaler."""
    if device.type != "cuda":
        return contextlib.nullcontext, torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def _select(entry: dict[str, Any]) -> float:
    """Higher is better: pixel AUROC when the validation masks allow it, else minus the validation loss."""
    return entry["val_pixel_auroc"] if entry.get("val_pixel_auroc") is not None else -entry["val_loss"]


def _epoch_plan(n: int, cfg: ImageAdapterConfig, gen: torch.Generator, world: int
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(optimizer steps: index tensors of at most batch_size * accum_steps * world samples, per-sample augmentation
    seeds [n]). Drawn from `gen` only, so every rank (and a single process with the same effective batch) plans
    the same epoch."""
    order = torch.randperm(n, generator=gen)
    seeds = torch.randint(0, 2**62, (n,), generator=gen)
    return list(order.split(cfg.batch_size * cfg.accum_steps * world)), seeds


def _image_epoch(backbone, model, anchors_by_class, train: ImageSet, cfg: ImageAdapterConfig, opt, sched,
                 gen: torch.Generator, amp, scaler, desc: str, progress: bool) -> dict[str, float]:
    """One stage-2 epoch with gradient accumulation, data-parallel when a process group is active.

    `model` is the ImageAdapters, or its DistributedDataParallel wrapper. Each optimizer step covers
    batch_size * accum_steps * world samples of one seeded permutation; rank r takes every world-th of them and
    splits its share into micro-batches of batch_size. Every micro-batch loss (a per-sample mean) is weighted by
    len(micro) * world / len(step), so after DDP's gradient averaging the step's gradient is the mean per-sample
    gradient over the whole step: the same as one process with batch_size * world (up to float summation order).
    Augmentation is seeded per sample (augment_batch seeds). Returns the mean training loss and parts over all
    ranks.
    """
    images, masks, labels, names = train
    device = _device(backbone)
    rank, world = dist_rank(), dist_world()
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    adapters = model.module if ddp else model
    adapters.train()
    steps, seeds = _epoch_plan(len(images), cfg, gen, world)
    sums = {"loss": 0.0, "cls": 0.0, "seg": 0.0}
    opt.zero_grad(set_to_none=True)
    for step in tqdm(steps, desc=desc, disable=not progress, leave=False):
        mine = step[rank::world]
        micro = list(mine.split(cfg.batch_size)) if len(mine) else [step[:1]]  # no share: one zero-weight pass
        weights = [len(idx) * world / len(step) if len(mine) else 0.0 for idx in micro]
        for k, (idx, w) in enumerate(zip(micro, weights)):
            x, m = augment_batch(images[idx], masks[idx].to(device), backbone.image_size, backbone.mean,
                                 backbone.std, enabled=cfg.augment, seeds=seeds[idx].tolist())
            a = stack_anchors(anchors_by_class, [names[i] for i in idx]).to(device).float()
            sync = contextlib.nullcontext() if (not ddp or k + 1 == len(micro)) else model.no_sync()
            with sync:
                with amp():
                    seg, det = model(backbone, x)
                loss, parts = image_stage_loss([t.float() for t in seg], det.float(), a, m, labels[idx].to(device),
                                               backbone.grid, ce_scale(adapters))
                scaler.scale(loss * w).backward()
            if w:
                for key, v in {"loss": float(loss.detach()), **parts}.items():
                    sums[key] += v * len(idx)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
    totals = all_reduce_sum(list(sums.values()), device)
    return {key: v / len(images) for key, v in zip(sums, totals)}


def _data_parallel(adapters: ImageAdapters, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the adapters when a process group is active (it broadcasts rank 0's initial
    weights), else the adapters themselves."""
    if dist_world() == 1:
        return adapters
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(adapters, device_ids=ids)


def train_image_adapters(backbone, anchors_by_class: dict[str, torch.Tensor], train: ImageSet,
                         val: ImageSet | None, cfg: ImageAdapterConfig, progress: bool = True
                         ) -> tuple[ImageAdapters, list[dict[str, Any]]]:
    """Stage 2: train image adapters against the frozen stage-1 anchors.

    train / val: (images uint8 [N, H, W, 3], masks [N, S, S] 0/1, labels [N], N class names); anchors_by_class
    {class: [2, E]} -> (adapters in eval mode, history). Loss = CE(100 * det . anchors, label) + sum over
    levels of seg_loss at the mask resolution S. Adam(betas 0.5, 0.999), MultiStepLR stepped per optimizer
    step, `accum_steps` micro-batches per step, autocast (+ GradScaler for fp16) only on CUDA, kornia
    augmentation on image and mask. With `val`, history[0] evaluates the untrained adapters and every epoch
    is evaluated; the adapters returned are those of the best epoch (pixel AUROC, or lowest val loss when the
    val masks are all normal), flagged `"selected": True`. Without `val`, the last epoch is kept.

    Under torchrun (an active process group, anomaly_core.distributed.init) the adapters are wrapped in
    DistributedDataParallel and each optimizer step covers batch_size * accum_steps * world_size samples split
    over the ranks (see _image_epoch); every rank evaluates the whole val split (same weights, same selection)
    and returns the same adapters and history. The caller writes files on rank 0 only.
    """
    cfg.validate("aaclip_image")
    check_image_size(cfg, backbone)
    train = _unpack(train, "train")
    val = _unpack(val, "val") if val is not None else None
    for split in (train, val) if val is not None else (train,):
        stack_anchors(anchors_by_class, sorted(set(split[3])))  # fail early on an unknown class
    device = _device(backbone)
    amp, scaler = _amp(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        adapters = ImageAdapters.for_backbone(backbone, cfg.adapt_until, cfg.adapt_weight, cfg.adapter).to(device)
        model = _data_parallel(adapters, device)
        torch.manual_seed(cfg.seed + dist_rank())  # per-rank global RNG (the training draws come from `gen`)
        opt = torch.optim.Adam(adapters.parameters(), lr=cfg.lr, betas=BETAS)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
        history: list[dict[str, Any]] = []
        if val is not None:
            history.append({"epoch": 0, **evaluate_image_adapters(backbone, adapters, anchors_by_class, val, cfg)})
        best, best_state = -math.inf, None
        for epoch in range(1, cfg.epochs + 1):
            entry = {"epoch": epoch, **_image_epoch(backbone, model, anchors_by_class, train, cfg, opt, sched, gen,
                                                    amp, scaler, f"aaclip image {epoch}/{cfg.epochs}", progress),
                     "lr": opt.param_groups[0]["lr"]}
            if val is not None:
                entry.update(evaluate_image_adapters(backbone, adapters, anchors_by_class, val, cfg))
                if _select(entry) > best:
                    best = _select(entry)
                    best_state = {k: v.detach().clone() for k, v in adapters.state_dict().items()}
            history.append(entry)
        if best_state is not None:
            adapters.load_state_dict(best_state)
            chosen = max((h for h in history if h["epoch"] > 0), key=_select)
        else:
            chosen = history[-1] if history else None
        if chosen is not None:
            chosen["selected"] = True
    return adapters.eval(), history
