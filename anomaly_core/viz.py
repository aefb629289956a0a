"""Plots for reports: heat-map overlays (numpy + PIL) and curve plots (matplotlib Agg canvas, no display needed)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["save_heatmap_overlays", "save_curve_plot", "map_overlay", "mask_overlay"]


def _new_figure(width_in: float, height_in: float) -> Figure:
    """A figure attached to an Agg canvas (no pyplot, no global backend state)."""
    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def _atomic_write(path, write) -> Path:
    """Write a file atomically: `write(binary file)` to a temp file in the same directory, then ``os.replace``."""
    from anomaly_core.io import atomic_path

    path = Path(path)
    with atomic_path(path, ".tmp") as tmp, open(tmp, "wb") as fh:
        write(fh)
    return path


def _atomic_savefig(fig: Figure, path, dpi: int = 100) -> Path:
    """Save ``fig`` to ``path`` atomically (format from the suffix)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return _atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi, bbox_inches="tight"))


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] of an uint8 [H, W, 3] or grey [H, W] image."""
    image = np.asarray(image)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _resize(x: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """float32 [h, w] -> [H, W] (bilinear, or nearest for masks)."""
    from PIL import Image

    x = np.asarray(x, dtype=np.float32)
    if x.shape == hw:
        return x
    im = Image.fromarray(x, mode="F").resize(hw[::-1], Image.NEAREST if nearest else Image.BILINEAR)
    return np.asarray(im, dtype=np.float32)


@lru_cache(maxsize=1)
def _jet() -> np.ndarray:
    """float64 [256, 3] matplotlib's jet look-up table x 255 (what `colormaps["jet"](x)` reads)."""
    import matplotlib

    return matplotlib.colormaps["jet"](np.arange(256))[:, :3] * 255.0


def _lut_index(x: np.ndarray) -> np.ndarray:
    """int [..] the jet table row matplotlib picks for x in [0, 1] (x * 256 truncated, 1.0 -> 255)."""
    return np.minimum((x * 256).astype(np.int64), 255)


def map_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3] image with the anomaly map [h, w] (stretched onto it, bilinear) in the jet colormap
    scaled to [vmin, vmax], alpha-blended on top."""
    image = _rgb(image)
    m = (_resize(amap, image.shape[:2]) - vmin) / max(vmax - vmin, 1e-12)
    colour = _jet()[_lut_index(np.clip(m, 0.0, 1.0))]  # [H, W, 3]
    return ((1 - alpha) * image + alpha * colour).round().clip(0, 255).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """uint8 [H, W, 3] image with the ground-truth mask [h, w] (stretched, nearest) as a translucent red fill
    and a lime contour (mask pixels with a non-mask 4-neighbour)."""
    from scipy import ndimage

    out = _rgb(image).astype(np.float32)
    m = _resize(np.asarray(mask, dtype=np.float32), out.shape[:2], nearest=True) > 0.5  # [H, W]
    out[m] = (1 - alpha) * out[m] + alpha * np.array([255.0, 0.0, 0.0])
    edge = m & ~ndimage.binary_erosion(m, border_value=1)
    out[edge] = (0.0, 255.0, 0.0)
    return out.round().astype(np.uint8)


def _colorbar(height: int, vmin: float, vmax: float, width: int = 12) -> np.ndarray:
    """uint8 [height, width, 3] vertical jet gradient, vmax at the top."""
    import matplotlib

    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    return (matplotlib.colormaps["jet"](ramp)[..., :3] * 255).astype(np.uint8)


def save_heatmap_overlays(path, images, masks, maps, titles, vmin=None, vmax=None) -> Path:
    """Write one PNG with one row per image: image | ground-truth overlay | anomaly-map overlay, each panel
    titled, and a colour bar of the map range on the right. Drawn with numpy + PIL (no figure layout: ~100x
    faster than a matplotlib figure, which made `evaluate` spend most of its time in `savefig`).

    Args:
        path: output file (PNG), written atomically; parent dirs are created.
        images: list of uint8 [H, W, 3] (or grey [H, W]); all rows are drawn at the first image's size.
        masks: list of bool [h, w] ground truth (stretched onto the image if sizes differ).
        maps: list of float [h, w] anomaly maps (stretched likewise).
        titles: list of str, one per row.
        vmin, vmax: colour range of the maps; None = min / max over ALL given maps (rows comparable).

    Returns:
        The written path.
    """
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    if n == 0 or not (len(masks) == len(maps) == len(titles) == n):
        raise ValueError(f"need equal non-zero lengths, got images={n} masks={len(masks)} "
                         f"maps={len(maps)} titles={len(titles)}")
    vmin = float(min(np.min(m) for m in maps)) if vmin is None else float(vmin)
    vmax = float(max(np.max(m) for m in maps)) if vmax is None else float(vmax)
    h, w = _rgb(images[0]).shape[:2]
    font = ImageFont.load_default()
    title_h, gap, bar_w = 16, 6, 60
    canvas = Image.new("RGB", (3 * w + 4 * gap + bar_w, n * (title_h + h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (img, mask, amap, title) in enumerate(zip(images, masks, maps, titles)):
        img = _rgb(img)
        if img.shape[:2] != (h, w):
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
        y = gap + row * (title_h + h + gap)
        panels = (img, mask_overlay(img, mask), map_overlay(img, amap, vmin, vmax))
        labels = (str(title), "ground truth", f"anomaly map [{vmin:.3g}, {vmax:.3g}]")
        for col, (panel, label) in enumerate(zip(panels, labels)):
            x = gap + col * (w + gap)
            canvas.paste(Image.fromarray(panel), (x, y + title_h))
            draw.text((x, y + 2), label, fill="black", font=font)
    bar_h = max(n * (title_h + h + gap) - gap - title_h, 16)
    bx = 3 * (w + gap) + gap
    canvas.paste(Image.fromarray(_colorbar(bar_h, vmin, vmax)), (bx, gap + title_h))
    draw.text((bx + 16, gap + title_h), f"{vmax:.3g}", fill="black", font=font)
    draw.text((bx + 16, gap + title_h + bar_h - 12), f"{vmin:.3g}", fill="black", font=font)
    return _atomic_write(path, lambda fh: canvas.save(fh, format="PNG", compress_level=1))


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
