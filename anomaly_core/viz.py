"""Plots for reports: heat-map overlays and curve plots (matplotlib Agg canvas, no display needed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["save_heatmap_overlays", "save_curve_plot"]


def _new_figure(width_in: float, height_in: float) -> Figure:
    """A figure attached to an Agg canvas (no pyplot, no global backend state)."""
    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def _atomic_savefig(fig: Figure, path, dpi: int = 100) -> Path:
    """Save ``fig`` to ``path`` atomically: write a temp file in the same directory, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _extent(image: np.ndarray) -> tuple[float, float, float, float]:
    """imshow extent covering ``image`` [H, W, ...] so maps/masks of another size are stretched onto it."""
    h, w = image.shape[:2]
    return (-0.5, w - 0.5, h - 0.5, -0.5)


def _show_image(ax, image: np.ndarray) -> None:
    """Draw an uint8 [H, W, 3] (or [H, W]) image without axes."""
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.set_axis_off()


def _draw_mask(ax, image: np.ndarray, mask: np.ndarray) -> None:
    """Image with the ground-truth mask [h, w] as a translucent red fill and a lime contour."""
    _show_image(ax, image)
    mask = np.asarray(mask, dtype=float)
    ext = _extent(image)
    ax.imshow(np.ma.masked_equal(mask, 0), cmap="autumn", alpha=0.35, extent=ext, interpolation="nearest")
    if mask.any() and not mask.all():
        h, w = image.shape[:2]
        ys = np.linspace(0, h - 1, mask.shape[0])
        xs = np.linspace(0, w - 1, mask.shape[1])
        ax.contour(xs, ys, mask, levels=[0.5], colors="lime", linewidths=1.0)


def _draw_map(ax, image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float):
    """Image with the anomaly map [h, w] alpha-blended on top (jet colormap)."""
    _show_image(ax, image)
    return ax.imshow(np.asarray(amap, dtype=float), cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax,
                     extent=_extent(image), interpolation="bilinear")


def save_heatmap_overlays(path, images, masks, maps, titles, vmin=None, vmax=None, dpi: int = 100) -> Path:
    """Write one PNG with one row per image: image | ground truth overlay | anomaly-map overlay.

    Args:
        path: output file (PNG), written atomically; parent dirs are created.
        images: list of uint8 [H, W, 3].
        masks: list of bool [h, w] ground truth (stretched onto the image if sizes differ).
        maps: list of float [h, w] anomaly maps (stretched likewise).
        titles: list of str, one per row.
        vmin, vmax: colour range of the maps; None = min / max over ALL given maps (rows comparable).
        dpi: output resolution.

    Returns:
        The written path.
    """
    n = len(images)
    if n == 0 or not (len(masks) == len(maps) == len(titles) == n):
        raise ValueError(f"need equal non-zero lengths, got images={n} masks={len(masks)} "
                         f"maps={len(maps)} titles={len(titles)}")
    vmin = float(min(np.min(m) for m in maps)) if vmin is None else float(vmin)
    vmax = float(max(np.max(m) for m in maps)) if vmax is None else float(vmax)
    fig = _new_figure(9.0, 3.0 * n)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, (img, mask, amap, title) in enumerate(zip(images, masks, maps, titles)):
        img = np.asarray(img)
        _show_image(axes[row, 0], img)
        axes[row, 0].set_title(str(title), fontsize=8)
        _draw_mask(axes[row, 1], img, mask)
        axes[row, 1].set_title("ground truth", fontsize=8)
        mappable = _draw_map(axes[row, 2], img, amap, vmin, vmax)
        axes[row, 2].set_title(f"anomaly map [{vmin:.3g}, {vmax:.3g}]", fontsize=8)
    fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
    return _atomic_savefig(fig, path, dpi=dpi)


def save_curve_plot(path, curves: dict, xlabel: str, ylabel: str, title: str, dpi: int = 100) -> Path:
    """Write a line plot PNG (atomically) with one line per ``curves`` entry.

    Args:
        path: output file.
        curves: ``{name: (x [K], y [K])}``.
        xlabel, ylabel, title: axis labels and title.

    Returns:
        The written path.
    """
    fig = _new_figure(5.0, 4.0)
    ax = fig.subplots()
    for name, (x, y) in curves.items():
        ax.plot(np.asarray(x, dtype=float), np.asarray(y, dtype=float), label=str(name), linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="best")
    return _atomic_savefig(fig, path, dpi=dpi)
