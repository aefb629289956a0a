"""What every stage script shares: params.yaml reading, seeding, device choice; the environment set-up (offline,
malloc) and the error printer are `anomaly_core.runtime`'s, shared with the CLI."""
from __future__ import annotations

import functools
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from anomaly_core.config import section
from anomaly_core.errors import ConfigError
from anomaly_core.runtime import error_lines, progress_enabled, setup_environment  # noqa: F401
from anomaly_core.runtime import friendly_errors as _friendly_errors

if TYPE_CHECKING:  # torch is imported by the stages that compute, not by skipped ones
    import torch

PARAMS = Path("params.yaml")

setup_environment()  # every stage imports this module first, before torch allocates anything

STAGE_TIMES = "ANOMALY_CORE_STAGE_TIMES"  # a JSON-lines file: each stage process appends its time split to it


def _process_age() -> float:
    """Seconds since this process started (Linux /proc; NaN elsewhere): interpreter start-up included."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def friendly_errors(fn):
    """`anomaly_core.runtime.friendly_errors`, and with ANOMALY_CORE_STAGE_TIMES=<file> one JSON line per run
    appended to that file: the stage, its arguments, `startup_s` (process start to the stage's main: interpreter
    start-up and imports) and `compute_s` (its main). scripts/benchmark.py --overhead reads it."""
    wrapped = _friendly_errors(fn)

    @functools.wraps(wrapped)
    def timed(*args, **kwargs):
        if not os.environ.get(STAGE_TIMES):
            return wrapped(*args, **kwargs)
        startup, t0 = _process_age(), time.perf_counter()
        try:
            return wrapped(*args, **kwargs)
        finally:
            import json
            import sys

            line = {"stage": Path(sys.argv[0]).stem, "args": sys.argv[1:], "startup_s": round(startup, 4),
                    "compute_s": round(time.perf_counter() - t0, 4)}
            with open(os.environ[STAGE_TIMES], "a", encoding="utf-8") as fh:  # one short append per process
                fh.write(json.dumps(line) + "\n")

    return timed


FAST_EXIT = "ANOMALY_CORE_FAST_EXIT"  # 0: a stage process ends through the interpreter's normal teardown


def run(app) -> None:
    """A stage script's entry point (`if __name__ == "__main__": run(app)`): the typer app, then, when the stage
    succeeded, `os._exit(0)` after flushing stdout / stderr instead of the interpreter's teardown (a process that
    imported torch spent 0.5-0.8 s in it: module and tensor finalisation, nothing of the stage's outputs).
    Every file a stage writes is closed by its main (`with` blocks, torch.save / safetensors / dvclive's `with
    Live`), so the outputs are the same; a failure (SystemExit != 0, an exception) takes the normal way out.
    ANOMALY_CORE_FAST_EXIT=0 keeps the normal teardown (e.g. under coverage, whose report is an atexit hook)."""
    import sys

    try:
        app()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    if os.environ.get(FAST_EXIT, "1") == "0":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def progress() -> bool:
    """Progress bars unless ANOMALY_CORE_PROGRESS=0 (tests)."""
    return progress_enabled()
