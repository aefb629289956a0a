"""What every stage script shares: params.yaml reading, seeding, device choice, error reporting."""
from __future__ import annotations

import functools
import inspect
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from anomaly_core.config import section
from anomaly_core.errors import ConfigError, DataError, WeightsError

if TYPE_CHECKING:  # torch is imported by the stages that compute, not by skipped ones
    import torch

PARAMS = Path("params.yaml")

# Offline by default: hub weights come from the local Hugging Face cache or not at all (fail fast, one line).
# ANOMALY_CORE_ONLINE=1 lets open_clip / timm download when the machine has a network.
if os.environ.get("ANOMALY_CORE_ONLINE") != "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


tune_malloc()  # every stage imports this module first, before torch allocates anything


def load_params(path: Path = PARAMS) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"missing {path} (run stages from the repository root)")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return params


def load_config(path: Path) -> dict[str, Any]:
    """A stage's resolved params (`data/config/<stage>.json`, written by the `validate` stage from params.yaml)."""
    if not path.is_file():
        raise ConfigError(f"missing {path}: run `dvc repro` (the validate stage writes it from params.yaml)")
    import json

    return json.loads(path.read_text())


def get(params: dict[str, Any], dotted: str) -> Any:
    return section(params, dotted)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    """CUDA when present (and not disabled with ANOMALY_CORE_DEVICE=cpu), else CPU."""
    import torch

    want = os.environ.get("ANOMALY_CORE_DEVICE", "")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def progress() -> bool:
    """Progress bars unless ANOMALY_CORE_PROGRESS=0 (tests) ."""
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
    return [f"error: {stage}: {line}" for line in text.splitlines() if line.strip()]


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


def skip_outputs(reason: str, files: tuple[Path, ...] = (), dirs: tuple[Path, ...] = ()) -> None:
    """A stage with nothing to do (a method not selected, task=classification) leaves empty, clearly marked
    outputs, so DVC's declared outputs exist."""
    from anomaly_core.io import write_json, write_skipped

    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "SKIPPED").write_text(reason + "\n")
    for f in files:
        if f.suffix == ".json":
            write_json(f, [])
        else:
            write_skipped(f, reason)
    print(f"skipped: {reason}")


def skip_unless_anomaly(params: dict[str, Any], files: tuple[Path, ...] = (), dirs: tuple[Path, ...] = ()) -> bool:
    """With `task: classification` the anomaly stages have nothing to do: skip them (see `skip_outputs`)."""
    if get(params, "task") == "anomaly":
        return False
    skip_outputs("task=classification: anomaly stages do not run", files, dirs)
    return True
