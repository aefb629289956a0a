"""Image and mask loading with uniform dtypes and explicit errors.

Every reader failure (missing file, unknown format, truncated data, wrong mask size)
raises :class:`anomaly_core.errors.DataError` with the offending path in the message.
Rules applied by this one reader (training, evaluation and predict alike):

- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): a phone photo tagged "rotated" is scored
  upright; :func:`image_size` reads the tag from the header too, so it agrees with :func:`load_image`.
- A pixel limit: an image whose header announces more than ``max_pixels`` (default :data:`MAX_PIXELS`,
  ``data.max_pixels`` / ``predict --max-pixels``) is refused before decoding. Pillow's own limit only warns.
- One 16-bit rule: 16-bit integer images are divided by 65535 into [0, 255] (``(v * 255 + 32767) // 65535``),
  whatever the image's own maximum; 32-bit float images are read as [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from anomaly_core.errors import DataError

__all__ = ["MAX_PIXELS", "IMAGE_EXTENSIONS", "is_image_file", "load_image", "load_mask", "image_size", "decode_size"]

# Lower-case suffixes recognised as images by the dataset readers.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Default pixel limit (width x height) above which an image is refused before decoding.
MAX_PIXELS = 40_000_000

_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a non-hidden file whose suffix is an image extension (case-insensitive)."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _check_pixels(path: str | os.PathLike, im: Image.Image, max_pixels: int | None) -> None:
    """Refuse an image whose header size exceeds ``max_pixels`` (before any decoding)."""
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    w, h = im.size
    if w * h > limit:
        raise DataError(f"image {path} is {w}x{h} (WxH) = {w * h:,} pixels, above the limit of {limit:,} "
                        f"(data.max_pixels / predict --max-pixels)")


def _open(path: str | os.PathLike, what: str, max_pixels: int | None = None) -> Image.Image:
    """Open (pixel limit checked on the header), decode and EXIF-orient an image; failure -> DataError naming ``path``."""
    try:
        with Image.open(path) as im:
            _check_pixels(path, im, max_pixels)
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return im.copy() if im.mode != "P" else im.convert("RGBA" if "transparency" in im.info else "RGB")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"cannot read {what} {path}: file does not exist") from None
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc


def _high_depth_to_uint8(im: Image.Image) -> np.ndarray:
    """16/32-bit integer or float single-channel image -> uint8 [H, W]."""
    arr = np.asarray(im)
    if im.mode == "F":
        return np.clip(np.nan_to_num(arr) * 255.0, 0, 255).round().astype(np.uint8)
    arr = arr.astype(np.int64)
    # the one 16-bit rule: integer high-depth pixels are 16-bit, divided by 65535 (never by the image's own max)
    return np.clip((arr * 255 + 32767) // 65535, 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]; alpha is composited on black."""
    if im.mode in _HIGH_DEPTH_MODES:
        gray = _high_depth_to_uint8(im)  # [H, W]
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)  # [H, W, 4]
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255
        return rgb.astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as RGB (EXIF orientation applied, at most ``max_pixels``, default MAX_PIXELS).

    Returns:
        uint8 array [H, W, 3] (grayscale/palette/16-bit/RGBA/CMYK/JPEG all converted).
    Raises:
        DataError: ``"cannot read image {path}: ..."`` for missing or corrupt files.
    """
    im = _open(path, "image", max_pixels)
    try:
        rgb = _to_rgb(im)
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return np.ascontiguousarray(rgb)


def _mask_array(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> numeric [H, W]; colour masks use the max over colour channels."""
    if im.mode in _HIGH_DEPTH_MODES or im.mode in ("1", "L"):
        return np.asarray(im)
    if im.mode in ("LA", "La"):
        return np.asarray(im)[:, :, 0]
    return np.asarray(im.convert("RGB")).max(axis=2)


def load_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None) -> np.ndarray:
    """Read a ground-truth mask (any pixel value > 0 is defective).

    Args:
        path: mask file.
        expected_hw: (H, W) of the corresponding image, or None to skip the check.
    Returns:
        bool array [H, W].
    Raises:
        DataError naming the mask file if it cannot be read or its size differs.
    """
    im = _open(path, "mask")
    mask = _mask_array(im) > 0  # [H, W] bool
    if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
        h, w = mask.shape
        eh, ew = expected_hw
        raise DataError(f"mask {path} has size {h}x{w} (HxW) but its image has size {eh}x{ew}")
    return mask


def decode_size(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) of an image after decoding every pixel (PIL `load()`): a truncated file fails here.

    Raises:
        DataError: ``"cannot read image {path}: ..."``.
    """
    return _dims(path, decode=True, max_pixels=max_pixels)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image read from the file header only (cheap, no pixel decoding)."""
    return _dims(path, decode=False)


def _dims(path: str | os.PathLike, decode: bool, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) from the header, after decoding every pixel when `decode`; one DataError naming the file."""
    try:
        with Image.open(path) as im:
            if decode:
                _check_pixels(path, im, max_pixels)
                im.load()
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation that swaps width and height
                w, h = h, w
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"cannot read image {path}: file does not exist") from None
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return int(h), int(w)
