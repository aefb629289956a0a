"""Data layer: image loading, dataset readers, the manifest and the synthetic demo dataset.

See docs/ARCHITECTURE.md for the manifest format.
"""

from anomaly_core.data.images import image_size, load_image, load_mask
from anomaly_core.data.manifest import (
    COLUMNS,
    Row,
    carve_val,
    categories,
    read_manifest,
    rows_for,
    select_shots,
    split_classification,
    write_manifest,
)
from anomaly_core.data.readers import READERS, read_imagefolder, read_mvtec, read_visa, validate_rows


def __getattr__(name: str):
    """`generate_demo` on first use: the demo generator pulls in scipy, which most stages never need."""
    if name == "generate_demo":
        from anomaly_core.data.demo import generate_demo

        return generate_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COLUMNS",
    "READERS",
    "Row",
    "carve_val",
    "categories",
    "generate_demo",
    "image_size",
    "load_image",
    "load_mask",
    "read_imagefolder",
    "read_manifest",
    "read_mvtec",
    "read_visa",
    "rows_for",
    "select_shots",
    "split_classification",
    "validate_rows",
    "write_manifest",
]
