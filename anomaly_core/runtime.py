"""What the stage scripts and the CLI share: the process set-up (offline by default, glibc malloc tuning), the
progress switch and the error printer (`error: <where>: <message>`, exit 2 for the library's named errors)."""
from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Callable

from anomaly_core.errors import ConfigError, DataError, WeightsError

__all__ = ["setup_environment", "tune_malloc", "release_memory", "progress_enabled", "error_lines", "friendly_errors"]


def setup_environment() -> None:
    """Offline by default: hub weights come from the local Hugging Face cache or not at all (fail fast, one line);
    ANOMALY_CORE_ONLINE=1 lets open_clip / timm download when the machine has a network. Then `tune_malloc`."""
    if os.environ.get("ANOMALY_CORE_ONLINE") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tune_malloc()


def tune_malloc() -> bool:
    """glibc: keep freed tensor memory in the heap instead of returning it to the OS after every batch.

    By default each large tensor is an mmap that is unmapped on free, and the next batch faults its pages in
    again: the features stage spent 6.7 s of 15 s in the kernel on a 520-image tree. Serving allocations up
    to 64 MB from the heap (M_MMAP_THRESHOLD), trimming only above 1 GB (M_TRIM_THRESHOLD) and growing by
    256 MB (M_TOP_PAD): 11 s, 0.8 s in the kernel. Values are unchanged; no effect off glibc or with
    ANOMALY_CORE_MALLOC=default."""
    if os.environ.get("ANOMALY_CORE_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(opt, value) == 1 for opt, value in ((-3, 64 << 20), (-1, 1 << 30), (-2, 256 << 20)))
    except (OSError, AttributeError):
        return False


def release_memory() -> bool:
    """glibc `malloc_trim(0)`: hand the free pages of every malloc arena back to the OS (what `tune_malloc`'s 1 GB
    trim threshold keeps, and what the per-thread arenas of a server's request threads hold). False off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def progress_enabled() -> bool:
    """Progress bars unless ANOMALY_CORE_PROGRESS=0 (tests)."""
    return os.environ.get("ANOMALY_CORE_PROGRESS", "1") != "0"


def error_lines(stage: str, exc: BaseException) -> list[str]:
    """`error: <stage>: <message>` lines for an exception (one per line of a multi-problem message).

    The library's named errors carry the file or key in their message; anything else gets its type name
    and, when it has one, the file it concerns (OSError.filename)."""
    named = isinstance(exc, (ConfigError, DataError, WeightsError))
    text = str(exc).strip() or type(exc).__name__
    if not named:
        where = getattr(exc, "filename", None)
        text = f"{type(exc).__name__}: {text}" + (f" ({where})" if where and str(where) not in text else "")
    prefix = f"error: {stage}: " if stage else "error: "
    return [prefix + line for line in text.splitlines() if line.strip()]


def friendly_errors(fn: Callable) -> Callable:
    """Any exception escaping the stage -> `error: <stage>: <message>` line(s) on stderr and exit code 2
    (1 for an unexpected exception). The traceback is printed only with ANOMALY_CORE_DEBUG=1."""
    stage = Path(inspect.getfile(fn)).stem  # stages/prepare.py -> prepare

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the point: no traceback for users, one line instead
            if os.environ.get("ANOMALY_CORE_DEBUG") == "1":
                import traceback

                traceback.print_exc()
            for line in error_lines(stage, exc):
                print(line, file=sys.stderr)
            named = isinstance(exc, (ConfigError, DataError, WeightsError))
            if not named and os.environ.get("ANOMALY_CORE_DEBUG") != "1":
                print(f"error: {stage}: (set ANOMALY_CORE_DEBUG=1 for the traceback)", file=sys.stderr)
            raise SystemExit(2 if named else 1) from None

    return wrapper
