"""Read cached features and method scores by manifest id (the files are per source split)."""
from __future__ import annotations

from pathlib import Path
import dataclasses
import json
from typing import Any, Mapping, Sequence

import torch

from anomaly_core.data.manifest import Row
from anomaly_core.errors import DataError
from anomaly_core.io import META_KEY, load_tensors, read_json, save_tensors

SOURCE = {"train": "train", "val": "test", "test": "test"}


def level_list(feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The `level_j` tensors of a feature dict, in level order (level_10 after level_9)."""
    return [feats[k] for k in sorted((k for k in feats if k.startswith("level_")), key=lambda s: int(s[6:]))]


class FeatureStore:
    """`data/features/{branch}/{category}/{source}.safetensors` with `ids` metadata."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._cache: dict[tuple[str, str, str], tuple[dict[str, torch.Tensor], dict[str, int]]] = {}
        self._meta: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.info = read_json(self.root / "info.json")

    def has(self, branch: str) -> bool:
        return branch in self.info

    def _file(self, branch: str, category: str, source: str):
        key = (branch, category, source)
        if key not in self._cache:
            tensors, meta = load_tensors(self.root / branch / category / f"{source}.safetensors")
            self._cache[key] = (tensors, {i: n for n, i in enumerate(meta["ids"])})
            self._meta[key] = meta
        return self._cache[key]

    def tiles(self, branch: str, rows: Sequence[Row]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(tile offsets [T, 2], tiled (H, W)) of the files holding `rows` (features extracted with tiling); a
        DataError when the features are not tiled or the rows' files were tiled differently."""
        found = set()
        for row in rows:
            tensors, _ = self._locate(branch, row)
            meta = next(m for k, m in self._meta.items() if self._cache[k][0] is tensors)
            if "tiles" not in meta:
                raise DataError(f"{row.id}: the cached {branch} features are not tiled; re-run `dvc repro features` "
                                "with tiling.enabled: true")
            found.add((tuple(map(tuple, meta["tiles"])), tuple(meta["tiled_hw"])))
        if len(found) != 1:
            raise DataError(f"category {rows[0].category}: its train and test images were tiled at different sizes "
                            f"({', '.join(f'{h}x{w}' for _, (h, w) in sorted(found))} px); set tiling.resolution "
                            "to a side in px")
        offsets, hw = found.pop()
        return torch.tensor(offsets, dtype=torch.long), hw

    def _locate(self, branch: str, row: Row) -> tuple[dict[str, torch.Tensor], int]:
        """The cached file and position of a row: its split's usual source first (val/test rows come from the
        dataset's test images), then the other one (classification splits re-deal test images into train)."""
        first = SOURCE[row.split]
        for source in (first, "test" if first == "train" else "train"):
            path = self.root / branch / row.category / f"{source}.safetensors"
            if source != first and not path.is_file():
                continue
            tensors, index = self._file(branch, row.category, source)
            if row.id in index:
                return tensors, index[row.id]
        raise DataError(f"{row.id}: not in the cached {branch} features; re-run `dvc repro features`")

    def get(self, branch: str, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """Features for manifest rows of one category (any mix of splits), in the rows' order, as float32."""
        if not rows:
            raise DataError("no rows requested")
        parts: dict[str, list[torch.Tensor]] = {}
        for row in rows:
            tensors, i = self._locate(branch, row)
            for k, v in tensors.items():
                parts.setdefault(k, []).append(v[i])
        return {k: torch.stack(v).float() for k, v in parts.items()}

    def levels(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return level_list(feats)


def check_finite(scores: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]], what: str) -> None:
    """DataError naming ``what`` (the stage / method) and the first category whose image scores [N] or maps
    [N, S, S] hold NaN / inf: no stage writes, ranks or fuses such scores."""
    for cat, (_, image, maps) in scores.items():
        bad_i, bad_m = int((~torch.isfinite(image)).sum()), int((~torch.isfinite(maps)).sum())
        if bad_i or bad_m:
            raise DataError(f"{what}: category {cat} has {bad_i} NaN/inf image scores and {bad_m} NaN/inf map "
                            "pixels")


def check_finite_state(state: Any, what: str) -> None:
    """DataError naming ``what`` (fit@<method> and category) when a fitted state (tensors, modules, dicts, lists,
    dataclasses of them) holds a NaN / inf tensor, with the tensor's path."""
    def walk(obj: Any, where: str):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                yield where
        elif isinstance(obj, torch.nn.Module):
            yield from walk(obj.state_dict(), where)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from walk(v, f"{where}[{i}]")
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                yield from walk(getattr(obj, f.name), f"{where}.{f.name}" if where else f.name)
    bad = list(walk(state, ""))
    if bad:
        raise DataError(f"{what}: the fitted state holds NaN/inf values (in {', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}); the training diverged: lower its lr or check its inputs")


def save_scores(path: str | Path, per_category: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]],
                what: str | None = None) -> None:
    """Write one method's scores for one split: {category: (ids, image [N], maps [N, S, S])}. NaN/inf scores, or
    maps beyond the stored float16 range, raise a DataError naming ``what`` (default: the path) and the category."""
    what = what or str(path)
    check_finite(per_category, what)
    tensors, ids = {}, {}
    for cat, (cat_ids, image, maps) in per_category.items():
        tensors[f"{cat}.image"] = image.float().cpu()
        tensors[f"{cat}.map"] = maps.half().cpu()
        if not bool(torch.isfinite(tensors[f"{cat}.map"]).all()):
            raise DataError(f"{what}: category {cat}: map values up to {float(maps.abs().max()):.4g} exceed the "
                            "float16 range of the stored maps (65504)")
        ids[cat] = list(cat_ids)
    save_tensors(path, tensors, {"ids": ids})


def load_scores(path: str | Path, lazy: bool = False) -> Mapping[str, tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Inverse of `save_scores`: {category: (ids, image [N] float32, maps [N, S, S] float32)}. `lazy`: a mapping
    that reads a category's tensors from the file when it is looked up and keeps nothing (evaluate: one category's
    maps in memory at a time, whatever the map size)."""
    if lazy:
        return LazyScores(path)
    tensors, meta = load_tensors(path)
    return {cat: (ids, tensors[f"{cat}.image"], tensors[f"{cat}.map"].float()) for cat, ids in meta["ids"].items()}


class LazyScores(Mapping):
    """`load_scores(path, lazy=True)`: the same values as the dict, each category read on lookup."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"missing file {self.path} (run the stage that writes it, e.g. `dvc repro`)")
        with safe_open(str(self.path), framework="pt") as f:
            self.ids = json.loads((f.metadata() or {})[META_KEY])["ids"]

    def __getitem__(self, cat: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        if cat not in self.ids:
            raise KeyError(cat)
        with safe_open(str(self.path), framework="pt") as f:
            return self.ids[cat], f.get_tensor(f"{cat}.image"), f.get_tensor(f"{cat}.map").float()

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)
