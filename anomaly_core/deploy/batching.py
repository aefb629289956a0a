"""predict's input pipeline: images decoded and resized in a thread pool, batches ahead of the one being scored.

PIL releases the GIL while it decodes and resizes, so the next batches' files are read while the engine runs the
backbone and the search on the current one; the hot path gets whole uint8 batches [B, S, S, 3] and never waits
on a file. An unreadable file is its error line (never an exception), in input order.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

__all__ = ["load_one", "prefetched_batches"]


def load_one(path: Path, size: int, max_pixels: int | None = None) -> tuple[np.ndarray | None, str]:
    """Decode and resize one file -> (uint8 [size, size, 3], "") or (None, its one-line error)."""
    from anomaly_core.data.images import IMAGE_EXTENSIONS, is_image_file
    from anomaly_core.features import load_resized

    if not is_image_file(path):  # only the formats the datasets use, whatever else PIL could open
        return None, (f"{Path(path).name}: unsupported image format {Path(path).suffix or '(none)'} "
                      f"(predict reads {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    try:
        return load_resized(str(path), size, max_pixels), ""
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported on its own line
        return None, (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def prefetched_batches(paths: Sequence[Path], size: int, batch_size: int, workers: int = 2, ahead: int = 2,
                       skip: Callable[[list[Path]], bool] | None = None, max_pixels: int | None = None
                       ) -> Iterator[tuple[int, list[Path], list[np.ndarray | None] | None, list[str] | None]]:
    """(start, chunk paths, images, errors) per batch of `batch_size` inputs, in order; up to `ahead` batches
    are decoded by `workers` threads while the caller scores the current one. A batch for which `skip(chunk)`
    is true is not decoded: it comes as (start, chunk, None, None) (predict --resume's finished batches)."""
    starts = list(range(0, len(paths), max(1, batch_size)))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        pending: list[list[Future] | None] = []

        def submit(b: int) -> None:
            if b < len(starts):
                chunk = list(paths[starts[b] : starts[b] + batch_size])
                pending.append(None if skip is not None and skip(chunk) else
                               [pool.submit(load_one, p, size, max_pixels) for p in chunk])

        for b in range(ahead + 1):
            submit(b)
        for b, start in enumerate(starts):
            futures = pending.pop(0)
            submit(b + ahead + 1)
            chunk = list(paths[start : start + batch_size])
            if futures is None:
                yield start, chunk, None, None
                continue
            done = [f.result() for f in futures]
            yield start, chunk, [d[0] for d in done], [d[1] for d in done]
