"""predict's input pipeline: images decoded and resized in a thread pool, batches ahead of the one being scored.

PIL releases the GIL while it decodes and resizes, so the next batches' files are read while the engine runs the
backbone and the search on the current one; the hot path gets whole uint8 batches [B, S, S, 3] and never waits
on a file. An unreadable file is its error line (never an exception), in input order.

`scored_batches` then scores those batches on `workers` threads at one torch intra-op thread each (an engine that
declares `concurrent = True`), results in input order: whole batches in parallel instead of one batch's ops split
over the cores. On 2 cores EfficientNet-Lite0's small ops (depthwise convolutions, batch norms) keep two intra-op
threads waiting on each other; two batches at one thread each do not (scripts/benchmark.py --predict measures both
layouts). The scores are bit-identical to one batch at a time at one torch thread, and equal to those on torch's
threads up to float rounding (intra-op threads can change a reduction's order; tests: within 1e-4).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["load_one", "prefetched_batches", "scored_batches", "Batch", "Scored"]

Batch = tuple[int, list[Path], "list[np.ndarray | None] | None", "list[str] | None"]  # prefetched_batches' items
Scored = tuple[list[int], Any, Any]  # (indices of the decoded images in the chunk, scores [n], maps [n, S, S])


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


def _score(model: Callable, batch: Batch, category: str) -> Scored:
    """One batch through the engine: the decoded images stacked (uint8 [n, S, S, 3]) -> (ok, scores [n], maps)."""
    import torch

    _, chunk, images, _ = batch
    ok = [i for i, im in enumerate(images or []) if im is not None]
    if not ok:
        return ok, None, None
    scores, maps = model(torch.from_numpy(np.stack([images[i] for i in ok])), category, [chunk[i] for i in ok])
    return ok, scores, maps


def scored_batches(model: Callable, batches: Iterable[Batch], category: str, workers: int = 1
                   ) -> Iterator[tuple[Batch, Scored | None]]:
    """(batch, (ok, scores, maps)) per batch of `prefetched_batches`, in order (None for a skipped batch).

    With `workers` > 1 and an engine whose `concurrent` is true (its call keeps no per-call state on the object),
    up to `workers` batches are scored at once, each on its own thread with one torch intra-op thread (the
    process's thread count is restored afterwards); otherwise one batch at a time on the caller's thread.
    Each worker's search holds its own working set (knn.max_memory_mb per worker)."""
    import torch

    if workers <= 1 or not getattr(model, "concurrent", False):
        for batch in batches:
            yield batch, (None if batch[2] is None else _score(model, batch, category))
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's and the default of new ones (the workers set theirs too)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="score",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending: deque[tuple[Batch, Future | None]] = deque()
            for batch in batches:
                pending.append((batch, None if batch[2] is None else pool.submit(_score, model, batch, category)))
                while len(pending) > workers:  # `workers` batches in flight while the caller writes the oldest
                    done, fut = pending.popleft()
                    yield done, (None if fut is None else fut.result())
            while pending:
                done, fut = pending.popleft()
                yield done, (None if fut is None else fut.result())
    finally:
        torch.set_num_threads(prev)
