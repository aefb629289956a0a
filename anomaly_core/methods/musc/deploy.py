"""MuSc's bundle: the generic one (`deploy/generic.py`: MuSc's own score on the images of one predict call, scored
as one unlabeled pool), except a tiled MuSc, which has none: the generic bundle extracts untiled features of the
new images, so its scores would not be the pipeline's. `export` and a predictor refuse it in one line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from anomaly_core.deploy import generic
from anomaly_core.deploy.bundle import BundleInputs, read_card
from anomaly_core.errors import DataError
from anomaly_core.kit.tiling import tiling_from

__all__ = ["write_bundle", "Predictor"]

REFUSAL = ("a tiled musc (tiling.enabled: true, musc.branch: visual) has no bundle: predict extracts untiled "
           "features; set export.method to another method (e.g. knn) or tiling.enabled: false")


def write_bundle(inputs: BundleInputs, out: Path, card: dict[str, Any]) -> dict:
    """The generic bundle, or a DataError when the score params tile."""
    if tiling_from(inputs.params.get("score", {}).get(inputs.method, {})) is not None:
        raise DataError(f"export: {REFUSAL}")
    return generic.write_bundle(inputs, out, card)


class Predictor(generic.Predictor):
    """The generic engine; a bundle whose score params tile (hand-made: export never writes one) is refused."""

    def __init__(self, bundle: str | Path, card: dict | None = None):
        card = card or read_card(Path(bundle))
        if tiling_from(card.get("score_params") or {}) is not None:
            raise DataError(f"{Path(bundle) / 'model.json'}: {REFUSAL}")
        super().__init__(bundle, card)
