"""Content fingerprints of the files the numbers come from, for the `fingerprint` DVC stage.

DVC hashes a stage's declared deps, but the dataset under `data.root`, a local `backbones.<b>.pretrained` file and
the cross-dataset root `aaclip.train_data.root` are named by params (a path, a tag, or nothing), not by dvc.yaml.
The `fingerprint` stage (always run: it must look at the files) hashes exactly the files the stages read and writes
one small JSON per source (`dataset.json`, `train_data.json`, `weights_<branch>.json`); the stages that read a
source depend on its JSON. The JSON is byte-identical while the files are, so nothing downstream re-runs; one image
replaced in place changes `dataset.json`, and `prepare`, `features` and what reads the images re-run.

Cost: a file is hashed (sha256) only when its stat key (device, inode, size, mtime, ctime) differs from the one
cached at the last run (`StatCache`, a JSON outside every DVC output); unchanged files cost one `stat`. ctime is
set by the kernel on every write or rename, so an in-place replacement that restores the old mtime (`cp -p`,
`touch -r`) is still re-hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from anomaly_core.io import write_json
from anomaly_core.weights_spec import EFFNET_LITE0_PACKAGE, is_random, weights_file

SCHEMA = 1
HASH_WORKERS = 4


def _stat_key(path: str) -> list[int]:
    st = os.stat(path)  # follows symlinks, as the readers do
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass
class StatCache:
    """{absolute path: (stat key, sha256)} of the last run. Only the entries used by this run are saved."""

    path: Path | None
    old: dict[str, list] = field(default_factory=dict)
    new: dict[str, list] = field(default_factory=dict)
    hashed: list[str] = field(default_factory=list)    # files read in full this run
    changed: list[str] = field(default_factory=list)   # of those, the ones whose content differs from the cache

    @classmethod
    def load(cls, path: Path | None) -> "StatCache":
        old: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text())
                old = raw.get("files", {}) if raw.get("schema") == SCHEMA else {}
            except (ValueError, AttributeError):  # a damaged cache only costs a full hash
                old = {}
        return cls(path, old)

    def digests(self, paths: Sequence[str]) -> dict[str, tuple[int, str]]:
        """{path: (size, sha256)} for `paths` (relative or absolute; keyed as given)."""
        absolute = {p: os.path.abspath(p) for p in paths}
        keys = {p: _stat_key(a) for p, a in absolute.items()}
        todo = [p for p in paths if (self.old.get(absolute[p]) or [None])[0] != keys[p]]
        with ThreadPoolExecutor(max_workers=HASH_WORKERS) as pool:  # hashlib releases the GIL on large reads
            fresh = dict(zip(todo, pool.map(lambda p: _sha256(absolute[p]), todo)))
        out = {}
        for p in paths:
            a = absolute[p]
            digest = fresh[p] if p in fresh else self.old[a][1]
            if p in fresh:
                self.hashed.append(p)
                if a in self.old and self.old[a][1] != digest:
                    self.changed.append(p)
            self.new[a] = [keys[p], digest]
            out[p] = (keys[p][2], digest)
        return out

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"schema": SCHEMA, "files": dict(sorted(self.new.items()))})


def _summary(files: dict[str, tuple[int, str]], base: Path | None) -> dict[str, Any]:
    """{"files": n, "bytes": total, "sha256": digest of the sorted (path, content digest) list}."""
    def name(p: str) -> str:
        if base is None:
            return Path(p).as_posix()
        try:
            return Path(os.path.abspath(p)).relative_to(os.path.abspath(base)).as_posix()
        except ValueError:
            return Path(os.path.abspath(p)).as_posix()

    h = hashlib.sha256()
    for rel, (_, digest) in sorted((name(p), v) for p, v in files.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return {"files": len(files), "bytes": sum(size for size, _ in files.values()), "sha256": h.hexdigest()}


def rows_fingerprint(rows: Iterable, root: Path, cache: StatCache, extra: Sequence[Path] = ()) -> dict[str, Any]:
    """Per category, the summary of every image and mask file of `rows` (manifest `Row`s), plus `extra` files
    (e.g. VisA's split CSV) under "extra"; paths are named relative to `root`."""
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        by_cat.setdefault(r.category, []).extend(p for p in (r.image, r.mask) if p)
    every = sorted({p for paths in by_cat.values() for p in paths} | {str(p) for p in extra})
    digests = cache.digests(every)
    out: dict[str, Any] = {"categories": {c: _summary({p: digests[p] for p in set(paths)}, root)
                                          for c, paths in sorted(by_cat.items())}}
    if extra:
        out["extra"] = _summary({str(p): digests[str(p)] for p in extra}, root)
    return out


def dataset_fingerprint(data_cfg, seed: int, cache: StatCache) -> dict[str, Any]:
    """`dataset.json`: the files of `data.root` that `prepare` reads (via `readers.read_dataset`). The demo's data is
    a DVC stage output (`data/demo`, a dep of its readers already): nothing to hash. A root the readers refuse is
    recorded with the reason (`prepare` then stops with that error)."""
    from anomaly_core.data import readers
    from anomaly_core.errors import ConfigError, DataError

    head = {"schema": SCHEMA, "format": data_cfg.format}
    if data_cfg.format == "demo":
        return {**head, "tracked_by": "data/demo (the demo_data stage's output)"}
    root = Path(data_cfg.root)
    head.update(root=data_cfg.root, categories=data_cfg.categories)
    if data_cfg.format == "folder":
        head["folder"] = asdict(data_cfg.folder)
    try:
        rows = readers.read_dataset(data_cfg, "", seed)
    except (ConfigError, DataError) as exc:
        return {**head, "unreadable": str(exc)}
    extra = [root / readers.VISA_CSV] if data_cfg.format == "visa" else []
    return {**head, **rows_fingerprint(rows, root, cache, extra)}


def train_data_fingerprint(raw: dict[str, Any] | None, cache: StatCache) -> dict[str, Any]:
    """`train_data.json`: the files of `aaclip.train_data.root` (the cross-dataset protocol), or its absence."""
    from anomaly_core.data import readers
    from anomaly_core.errors import ConfigError, DataError

    raw = raw or {}
    fmt = raw.get("format", "")
    if not fmt:
        return {"schema": SCHEMA, "format": ""}
    root = Path(raw.get("root", ""))
    head = {"schema": SCHEMA, "format": fmt, "root": raw.get("root", ""), "categories": raw.get("categories", "all")}
    try:
        if not root.is_dir():
            raise ConfigError(f"aaclip.train_data.root={raw.get('root', '')}: directory not found")
        rows = readers.READERS[fmt](root, head["categories"])
    except (ConfigError, DataError) as exc:
        return {**head, "unreadable": str(exc)}
    extra = [root / readers.VISA_CSV] if fmt == "visa" else []
    return {**head, **rows_fingerprint(rows, root, cache, extra)}


def weights_fingerprint(raw: dict[str, Any] | None, cache: StatCache) -> dict[str, Any]:
    """`weights_<branch>.json`: the backbone spec and, when it loads a local file (a path, or the EfficientNet-Lite0
    package's file), that file's size and sha256. A branch no selected method reads is `{"used": false}`; a hub tag is
    recorded as a tag (its files are the hub's, fixed per tag)."""
    if raw is None:
        return {"schema": SCHEMA, "used": False}
    spec = raw.get("pretrained")
    out: dict[str, Any] = {"schema": SCHEMA, "used": True, "name": raw.get("name"), "pretrained": spec}
    path = weights_file(spec)
    if path is None:
        out["file"] = None if is_random(spec) else "hub tag (not hashed)"
    elif not path.is_file():
        out["file"] = "missing"  # validate refuses a missing file; a stage run by hand fails on it
    else:
        size, digest = cache.digests([str(path)])[str(path)]
        out["file"] = {"bytes": size, "sha256": digest}
        if spec == EFFNET_LITE0_PACKAGE:
            out["file"]["package"] = EFFNET_LITE0_PACKAGE
    return out
