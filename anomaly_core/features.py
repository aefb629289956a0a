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


def load_resized(path: str, size: int) -> np.ndarray:
    """Read an image as RGB and resize it to [size, size, 3] uint8 (PIL bicubic, the CLIP convention)."""
    img = load_image(path)
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return img


def iter_batches(paths: Sequence[str], size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield uint8 batches [B, size, size, 3]; decoding runs one batch ahead in a thread."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]

    def load(chunk: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([load_resized(p, size) for p in chunk]))

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
        feats = backbone(preprocess(batch, backbone.image_size, backbone.mean, backbone.std))
        for j, level in enumerate(feats["levels"]):
            out.setdefault(f"level_{j}", []).append(level.to(dtype))
        if "global" in feats:
            out.setdefault("global", []).append(feats["global"].to(dtype))
        bar.update(len(batch))
    bar.close()
    return {k: torch.cat(v) for k, v in out.items()}
