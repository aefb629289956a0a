"""Frozen-backbone feature extraction into one tensor dict per (branch, category, source split)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from anomaly_core.backbones import preprocess
from anomaly_core.data.images import load_image


def load_resized(path: str, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as RGB (EXIF-oriented, at most `max_pixels`) and resize it to [size, size, 3] uint8 (PIL
    bicubic, the CLIP convention)."""
    img = load_image(path, max_pixels)
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return img


def load_batch(paths: Sequence[str], size: int, max_pixels: int | None = None) -> torch.Tensor:
    """Decode and resize images -> uint8 [N, size, size, 3] (the features stage's, predict's and AA-CLIP's reader)."""
    return torch.from_numpy(np.stack([load_resized(str(p), size, max_pixels) for p in paths]))


def iter_batches(paths: Sequence[str], size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield uint8 batches [B, size, size, 3]; decoding runs one batch ahead in a thread."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    # the pipeline's rows passed `prepare`, which enforced data.max_pixels on every image: no second limit here
    load = lambda chunk: load_batch(chunk, size, max_pixels=2**62)  # noqa: E731

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for nxt in chunks[1:] + [None]:
            batch = pending.result()
            pending = pool.submit(load, nxt) if nxt is not None else None
            yield batch


@torch.no_grad()
def extract_features(backbone, paths: Sequence[str], batch_size: int = 16, dtype: torch.dtype = torch.float16,
                     desc: str = "features", progress: bool = True) -> dict[str, torch.Tensor]:
    """Run a frozen backbone over images.

    Returns {"level_j": [N, ...] per level} (+ {"global": [N, E]} for CLIP), stored in `dtype`.
    """
    out: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    for batch in iter_batches(paths, backbone.image_size, batch_size):
        for key, value in encode_batch(backbone, batch, dtype).items():
            out.setdefault(key, []).append(value)
        bar.update(len(batch))
    bar.close()
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def encode_batch(backbone, images: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """uint8 images [B, S, S, 3] -> {"level_j": [B, ...]} (+ {"global": [B, E]} for CLIP) in `dtype`: what the
    features stage caches per image (predict encodes new images with it, so they match the cache)."""
    feats = backbone(preprocess(images, backbone.image_size, backbone.mean, backbone.std))
    out = {f"level_{j}": level.to(dtype) for j, level in enumerate(feats["levels"])}
    if "global" in feats:
        out["global"] = feats["global"].to(dtype)
    return out


@torch.no_grad()
def extract_features_sharded(backbone, paths: Sequence[str], batch_size: int = 16,
                             dtype: torch.dtype = torch.float16, desc: str = "features", progress: bool = True
                             ) -> dict[str, torch.Tensor] | None:
    """`extract_features` split over the ranks of an active process group (anomaly_core.distributed).

    The image list is cut into the same batches as a single process (batch b = paths[b*B:(b+1)*B]); rank r runs
    batches r, r + world, ... and rank 0 gathers them (CPU) and concatenates in batch order, so every batch goes
    through the backbone with the same shape and content as in a single-process run and the result holds the
    same values. Returns the feature dict on rank 0 and None on the other ranks; without a process group it is
    `extract_features`. (Bit-identity also needs the same intra-op thread count per process: torchrun sets
    OMP_NUM_THREADS=1, so set it for single-process runs you compare against.)
    """
    from anomaly_core import distributed as dist

    if dist.world_size() == 1 or not paths:
        return extract_features(backbone, paths, batch_size, dtype, desc, progress)
    n_batches = -(-len(paths) // batch_size)
    mine = dist.shard(n_batches, dist.rank(), dist.world_size())
    my_paths = [p for b in mine for p in paths[b * batch_size : (b + 1) * batch_size]]
    feats = extract_features(backbone, my_paths, batch_size, dtype, desc, progress) if my_paths else {}
    sizes = [min(batch_size, len(paths) - b * batch_size) for b in mine]
    parts = {b: {k: v[s - n : s].cpu() for k, v in feats.items()}  # batch b's rows of this rank's output
             for b, n, s in zip(mine, sizes, [sum(sizes[: i + 1]) for i in range(len(sizes))])}
    gathered = dist.gather_objects(parts)
    if gathered is None:
        return None
    by_batch = {b: f for part in gathered for b, f in part.items()}
    keys = list(by_batch[0])
    return {k: torch.cat([by_batch[b][k] for b in range(n_batches)]) for k in keys}
