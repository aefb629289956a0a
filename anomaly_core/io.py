"""All file formats in one place: atomic JSON/YAML, safetensors feature and score files, checkpoints.

Every writer writes to a temporary name in the destination directory and renames it into place, so a
crash never leaves a half-written output.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from anomaly_core.errors import DataError, WeightsError

if TYPE_CHECKING:  # torch is imported where tensors are read or written: JSON-only stages start without it
    import torch

CHECKPOINT_SCHEMA = 1
META_KEY = "anomaly_core"


def file_mode() -> int:
    """The mode of a new output file: 0666 minus the umask (0644 with the usual umask 022), as `open` creates them;
    `mkstemp`'s 0600 would make a copied bundle or metrics file unreadable by the group."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` (mode `file_mode()`) only if the block
    succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def replace_dir(new: str | Path, dest: str | Path) -> None:
    """Put the complete directory `new` at `dest` with no moment where `dest` is missing or partial: an atomic
    exchange of the two names (Linux `renameat2(RENAME_EXCHANGE)`), then the old tree is deleted. Where the exchange
    is unavailable: the old tree is renamed aside (`<dest>.old-<pid>`), `new` renamed in, the old one deleted."""
    import ctypes
    import shutil

    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.rename(new, dest)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        exchanged = libc.renameat2(-100, os.fsencode(new), -100, os.fsencode(dest), 2) == 0  # AT_FDCWD, EXCHANGE
    except (AttributeError, OSError):
        exchanged = False
    if exchanged:
        shutil.rmtree(new)  # now the old tree
        return
    old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
    os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old)


def write_json(path: str | Path, obj: Any, sort_keys: bool = False) -> None:
    """Atomic, indented JSON write (keys in insertion order, or sorted)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def jsonable(obj: Any, digits: int = 6) -> Any:
    """Plain JSON values from nested dicts / lists / tuples of tensors, numpy values and floats (rounded;
    non-finite floats become None)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, digits) for v in obj]
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    if isinstance(obj, np.ndarray) or (torch is not None and isinstance(obj, torch.Tensor)):
        return jsonable(obj.tolist(), digits)
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), digits)
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    return obj


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path} (run the stage that writes it, e.g. `dvc repro`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomic safetensors write; the metadata travels as one JSON string under the key `anomaly_core`.

    One key only: safetensors writes its metadata map in hash order, so several keys would make byte-different
    files for identical content (and DVC would see a change on every re-run).
    """
    from safetensors.torch import save_file

    meta = {META_KEY: json.dumps(metadata or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file -> (tensors, metadata with JSON values decoded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file {path} (run the stage that writes it, e.g. `dvc repro`)")
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta_raw = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    if META_KEY in meta_raw:
        return tensors, json.loads(meta_raw[META_KEY])
    meta = {}
    for k, v in meta_raw.items():  # files written by other tools: decode what is JSON
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def save_checkpoint(path: str | Path, kind: str, arch: str, state: dict[str, torch.Tensor], **extra: Any) -> None:
    """Plain state_dict checkpoint with a schema version, the checkpoint kind and the architecture name."""
    import torch

    payload = {"schema": CHECKPOINT_SCHEMA, "kind": kind, "arch": arch, "state_dict": state, **extra}
    buffer = io.BytesIO()  # a buffer, not the temp file: torch.save names the zip archive after the file
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


SKIPPED_MARK = b"anomaly_core: skipped stage output\n"  # first bytes of a skipped stage's checkpoint path


def write_skipped(path: str | Path, reason: str) -> None:
    """The declared checkpoint output of a stage that had nothing to do: a short text file (no torch needed)
    that `load_checkpoint` recognises and refuses with the reason."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(SKIPPED_MARK + reason.encode() + b"\n")


def load_checkpoint(path: str | Path, kind: str, arch: str | None = None) -> dict[str, Any]:
    """Load and check a checkpoint written by `save_checkpoint`; refuse another kind, schema or architecture,
    and a skipped stage's output (`write_skipped`)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(len(SKIPPED_MARK) + 512)
    if head.startswith(SKIPPED_MARK):
        reason = head[len(SKIPPED_MARK):].decode(errors="replace").strip()
        raise WeightsError(f"{path}: the stage that writes it was skipped ({reason}); select the method and re-run")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "schema" not in obj:
        raise WeightsError(f"{path}: not an anomaly_core checkpoint (no schema version); re-train it with this version")
    if obj["schema"] != CHECKPOINT_SCHEMA:
        raise WeightsError(f"{path}: checkpoint schema {obj['schema']}, this version reads {CHECKPOINT_SCHEMA}; re-train it")
    if obj.get("kind") != kind:
        raise WeightsError(f"{path}: holds a '{obj.get('kind')}' checkpoint, expected '{kind}'")
    if arch is not None and obj.get("arch") != arch:
        raise WeightsError(f"{path}: made for architecture '{obj.get('arch')}', the pipeline uses '{arch}'; re-train it")
    return obj
