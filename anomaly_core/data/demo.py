"""Synthetic MVTec-AD-layout demo dataset (no download needed).

Categories
    * textures ``brick``, ``grass``, ``gravel``: random 320/512 crops of scikit-image's bundled
      grayscale photographs (fixed orientation), brightness jitter, per-category tint, noise.
    * objects ``washer`` (round ring, default) and ``nut`` (hexagonal, optional): a shaded,
      machined metal part drawn with numpy on a plain background, small pose/lighting jitter.
    * further categories for an MVTec-AD-sized tree (``MVTEC_SIZED``: 15 categories, 5 textures and
      10 objects, ~240 train and 115 test images each): textures ``lunar`` and ``tissue`` from two more
      bundled photographs (``moon``, ``immunohistochemistry``) and eight more parts (polygon nuts and plates, a gasket, a
      disc, ...) differing in outline, hole size, tint and rotation range. Adding them changes nothing of
      the default categories' output (their photos, random draws and arithmetic are untouched).

Defects (``DEFECT_TYPES``), each with size and contrast drawn per image so that subtle
small defects and obvious large ones both occur:
    ``scratch`` thin lighter/darker polyline; ``hole`` dark ellipse with raised soft rim;
    ``stain`` soft blob with a colour shift; ``foreign`` pasted patch of another texture.

Every defect is rendered as ``out = clean + alpha * (target - clean)`` with a compactly
supported ``alpha``; the mask is exactly ``alpha > 0`` so no pixel outside the mask changes.
For objects ``alpha`` is restricted to the object. Output is a pure function of the seed
(per-image numpy Generators keyed by zlib.crc32 of category / image names).
"""

from __future__ import annotations

import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from anomaly_core.errors import ConfigError

__all__ = ["generate_demo", "DEFAULT_CATEGORIES", "AVAILABLE_CATEGORIES", "DEFECT_TYPES", "render_sample",
           "MVTEC_SIZED", "mvtec_sized"]

# category -> (photo name, RGB tint)
TEXTURES: dict[str, tuple[str, tuple[float, float, float]]] = {
    "brick": ("brick", (1.0, 0.72, 0.58)),
    "grass": ("grass", (0.72, 1.0, 0.55)),
    "gravel": ("gravel", (1.0, 0.95, 0.86)),
}
# further textures (MVTec-AD-sized tree): category -> (photo name, RGB tint). Kept apart from TEXTURES: the
# `foreign` defect draws its patch from TEXTURES' photos only, so the default categories' output is unchanged.
EXTRA_TEXTURES: dict[str, tuple[str, tuple[float, float, float]]] = {
    "lunar": ("moon", (0.92, 0.92, 1.0)),
    "tissue": ("immunohistochemistry", (1.0, 0.85, 0.9)),
}
# category -> number of sides of the outer contour (0 = circle)
OBJECTS: dict[str, int] = {"washer": 0, "nut": 6}


@dataclass(frozen=True)
class _Part:
    """An object's drawing parameters: outline sides (0 = circle), hole radius / image side, metal tint (RGB),
    rotation range (x the default +-0.25 rad)."""

    sides: int
    hole: float = 0.15
    tint: tuple[float, float, float] = (0.95, 0.98, 1.04)
    spin: float = 1.0


# further objects (MVTec-AD-sized tree); washer and nut are _Part(0) and _Part(6)
EXTRA_OBJECTS: dict[str, _Part] = {
    "square_nut": _Part(4, 0.14, spin=3.0),
    "triangle_plate": _Part(3, 0.10, (1.0, 0.97, 0.92), spin=4.0),
    "pentagon_nut": _Part(5, 0.15, (0.98, 0.98, 0.98), spin=2.0),
    "octagon_nut": _Part(8, 0.17, (0.92, 0.96, 1.08)),
    "gasket": _Part(0, 0.28, (1.08, 0.82, 0.62)),  # a thin ring: below ~96 px a scratch may not fit on it
    "brass_nut": _Part(6, 0.16, (1.1, 0.95, 0.6), spin=6.0),
    "disc": _Part(0, 0.06, (0.8, 0.8, 0.84)),
    "dodecagon": _Part(12, 0.2, (0.9, 0.95, 1.1), spin=2.0),
}
DEFAULT_CATEGORIES = ["brick", "grass", "gravel", "washer"]
AVAILABLE_CATEGORIES = sorted([*TEXTURES, *EXTRA_TEXTURES, *OBJECTS, *EXTRA_OBJECTS])
# an MVTec-AD-sized tree: 15 categories (5 textures, 10 objects), 240 train and 35 + 4 x 20 = 115 test images each
MVTEC_SIZED: dict = {"categories": sorted([*TEXTURES, *EXTRA_TEXTURES, *OBJECTS, *EXTRA_OBJECTS]), "n_train": 240,
                     "n_test_good": 35, "n_test_defect_per_type": 20, "size": 256}


def mvtec_sized(scale: float = 1.0, categories: int | None = None) -> dict:
    """generate_demo keyword arguments of the MVTec-AD-sized tree, image counts x `scale` (each at least 1), the
    first `categories` of its 15 categories (default all). `generate_demo(root, seed, **mvtec_sized(0.1))`."""
    if not 0 < scale <= 1:
        raise ConfigError(f"MVTec-sized scale must be in (0, 1], got {scale}")
    cats = MVTEC_SIZED["categories"]
    n_cat = len(cats) if categories is None else int(categories)
    if not 1 <= n_cat <= len(cats):
        raise ConfigError(f"MVTec-sized categories must be 1..{len(cats)}, got {categories}")
    out = {k: max(1, round(v * scale)) for k, v in MVTEC_SIZED.items() if k.startswith("n_")}
    return {**out, "categories": cats[:n_cat], "size": MVTEC_SIZED["size"]}
DEFECT_TYPES = ("scratch", "hole", "stain", "foreign")

_CROP_FRACTION = 5 / 8  # texture crop side relative to the 512 px photo
_MIN_MASK_PX = 6
_ALPHA_FLOOR = 0.25  # smaller blend weights are zeroed (mask == changed pixels == visible defect)
_STAIN_TINTS = np.array([(0.75, 0.45, 0.20), (0.95, 0.85, 0.35), (0.25, 0.25, 0.30), (0.40, 0.55, 0.90)], np.float32)


# ---------------------------------------------------------------------------- randomness / sources


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """Generator seeded by ``seed`` and crc32 of each key (stable across runs and platforms)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(k.encode()) for k in keys)])


@lru_cache(maxsize=1)
def _photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled grayscale photos, loaded once: name -> uint8 [512, 512]."""
    return _load_photos(tuple(sorted({p for p, _ in TEXTURES.values()})))


@lru_cache(maxsize=1)
def _extra_photos() -> dict[str, np.ndarray]:
    """The photos of EXTRA_TEXTURES (colour ones as luminance): name -> uint8 [H, W]."""
    return _load_photos(tuple(sorted({p for p, _ in EXTRA_TEXTURES.values()})))


def _load_photos(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    from skimage import data as skdata  # lazy: importing skimage is slow

    out = {}
    for name in names:
        img = np.asarray(getattr(skdata, name)())
        if img.ndim == 3:  # future-proof: colour version -> luminance
            img = (img[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        out[name] = np.ascontiguousarray(img)
    return out


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), each float32 [size, size]."""
    ax = np.arange(size, dtype=np.float32)
    return np.meshgrid(ax, ax, indexing="ij")


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# ---------------------------------------------------------------------------- normal images


def _texture_gray(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    """Random crop of a photo, resized: float32 [size, size] in 0..255."""
    side = int(min(photo.shape) * _CROP_FRACTION)
    y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
    crop = photo[y : y + side, x : x + side]  # fixed orientation, as a camera on a line sees a material
    im = Image.fromarray(np.ascontiguousarray(crop))
    if side != size:
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32)


def _texture_image(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """Normal texture image: float32 [size, size, 3] in 0..255."""
    if category in TEXTURES:
        photo_name, tint = TEXTURES[category]
        photo = _photos()[photo_name]
    else:
        photo_name, tint = EXTRA_TEXTURES[category]
        photo = _extra_photos()[photo_name]
    gray = _texture_gray(rng, photo, size)
    gray = gray * rng.uniform(0.92, 1.08) + rng.uniform(-6.0, 6.0)
    tint_j = np.asarray(tint, np.float32) * rng.uniform(0.98, 1.02, 3).astype(np.float32)
    img = gray[:, :, None] * tint_j + 2.0 * rng.standard_normal((size, size, 3), dtype=np.float32)
    return np.clip(img, 0.0, 255.0)


def _outer_distance(dx: np.ndarray, dy: np.ndarray, sides: int, theta: float) -> np.ndarray:
    """Radius-like distance whose level sets are circles (sides=0) or regular polygons."""
    if sides == 0:
        return np.hypot(dx, dy)
    angles = theta + np.arange(sides) * (2 * np.pi / sides)
    return np.maximum.reduce([dx * np.cos(a) + dy * np.sin(a) for a in angles])


def _object_image(rng: np.random.Generator, category: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shaded metal ring / nut on a plain background.

    Returns:
        image float32 [size, size, 3] in 0..255, object region bool [size, size]
        (eroded by ~2 px so defects stay on the part).
    """
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    part = _Part(OBJECTS[category]) if category in OBJECTS else EXTRA_OBJECTS[category]
    theta = float(rng.uniform(-0.25, 0.25))
    outer = _outer_distance(dx, dy, part.sides, theta if part.spin == 1.0 else theta * part.spin)
    inside = np.minimum(0.36 * size - outer, r - part.hole * size)  # >0 in the material, px
    alpha = np.clip(inside + 0.5, 0.0, 1.0)

    bevel = 0.05 * size
    height = _smoothstep(inside / bevel) * bevel * 0.8
    gy, gx = np.gradient(height)
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    az, el = np.deg2rad(225 + rng.uniform(-20, 20)), np.deg2rad(45 + rng.uniform(-8, 8))
    light = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], np.float32)
    lambert = (-gx * light[0] - gy * light[1] + light[2]) / norm
    r_mid = 0.255 * size
    metal = rng.uniform(140, 165) * (0.45 + 0.65 * lambert)
    metal += 5.0 * np.sin(2 * np.pi * r / max(size / 36, 2.0))  # machining marks
    metal += rng.uniform(18, 32) * np.exp(-(((r - r_mid) / (0.07 * size)) ** 2))  # specular band
    metal_rgb = metal[:, :, None] * np.array(part.tint, np.float32)

    bg = np.array([44, 48, 54], np.float32) * rng.uniform(0.9, 1.1)
    bg_img = bg + (yy / size - 0.5)[:, :, None] * 10.0
    shadow = ndimage.gaussian_filter(np.roll(alpha, (max(size // 80, 1),) * 2, axis=(0, 1)), size / 100)
    bg_img = bg_img * (1.0 - 0.35 * shadow[:, :, None])

    img = bg_img * (1 - alpha[:, :, None]) + metal_rgb * alpha[:, :, None]
    img += 1.5 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0.0, 255.0).astype(np.float32), inside >= 2.0


def _normal_image(rng: np.random.Generator, category: str, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(image float32 [S, S, 3], allowed defect region bool [S, S] or None = everywhere)."""
    if category in TEXTURES or category in EXTRA_TEXTURES:
        return _texture_image(rng, category, size), None
    return _object_image(rng, category, size)


# ---------------------------------------------------------------------------- defects


@dataclass
class _Spec:
    """Per-image defect parameters: centre (y, x) px, characteristic radius px, contrast in [0,1]."""

    cy: float
    cx: float
    radius: float
    contrast: float
    width: float | None = None  # small-defect mode (`defect_px`): the defect's width in px


def _draw_spec(rng: np.random.Generator, size: int, allowed: np.ndarray | None,
               defect_px: tuple[float, float] | None = None) -> _Spec:
    """Log-uniform radius (5%..16% of the image, smaller on objects), uniform contrast in [0.3, 1]. With
    `defect_px` = (lo, hi): a log-uniform width in [lo, hi] px whatever the image size (radius = width / 2)."""
    radius = size * float(np.exp(rng.uniform(np.log(0.05), np.log(0.16))))
    contrast = float(rng.uniform(0.3, 1.0))
    width = None
    if defect_px is not None:
        width = float(np.exp(rng.uniform(np.log(defect_px[0]), np.log(defect_px[1]))))
        radius, contrast = width / 2, 0.5 + 0.5 * contrast
    if allowed is None:
        cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
        return _Spec(float(cy), float(cx), radius, contrast, width)
    radius *= 0.75
    dist = ndimage.distance_transform_edt(allowed)
    ys, xs = np.nonzero(dist >= min(radius * 0.5, dist.max() * 0.7))
    i = rng.integers(len(ys))
    return _Spec(float(ys[i]), float(xs[i]), radius, contrast, width)


def _segment_distance(yy, xx, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of every pixel to segment p0-p1 (points as (y, x)): float32 [H, W]."""
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _scratch(rng, img, spec: _Spec, ctx) -> tuple[np.ndarray, np.ndarray]:
    """Thin random polyline, lighter or darker. Returns (target [H,W,3], alpha [H,W])."""
    yy, xx = _grid(img.shape[0])
    n_seg = int(rng.integers(2, 5))
    length = spec.radius * rng.uniform(2.5, 5.0) if spec.width is None else spec.width * rng.uniform(6.0, 12.0)
    seg_len = length / n_seg
    angle = rng.uniform(0, 2 * np.pi)
    pts = [np.array([spec.cy, spec.cx]) - seg_len * n_seg / 2 * np.array([np.sin(angle), np.cos(angle)])]
    for _ in range(n_seg):
        angle += rng.normal(0.0, 0.45)
        pts.append(pts[-1] + seg_len * np.array([np.sin(angle), np.cos(angle)]))
    dist = np.minimum.reduce([_segment_distance(yy, xx, a, b) for a, b in zip(pts[:-1], pts[1:])])
    width = max(1.0, img.shape[0] / 256 * rng.uniform(2.0, 5.0)) if spec.width is None else spec.width
    alpha = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return img + sign * (15.0 + 130.0 * spec.contrast), alpha


def _hole(rng, img, spec: _Spec, ctx) -> tuple[np.ndarray, np.ndarray]:
    """Dark filled ellipse (darker towards its centre) with a soft, slightly raised rim."""
    yy, xx = _grid(img.shape[0])
    a = spec.radius * rng.uniform(0.6, 1.0)
    b = a * rng.uniform(0.55, 1.0)
    t = rng.uniform(0, np.pi)
    u = (xx - spec.cx) * np.cos(t) + (yy - spec.cy) * np.sin(t)
    v = -(xx - spec.cx) * np.sin(t) + (yy - spec.cy) * np.cos(t)
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the ellipse boundary
    rim_w = max(1.5 / b, 0.2)  # half-width of the rim relative to the ellipse
    core = _smoothstep((1.0 - q) / 0.2)
    rim = np.where(np.abs(q - 1.0) < rim_w, 0.6 * np.cos(0.5 * np.pi * (q - 1.0) / rim_w), 0.0)
    rim = np.where(rim < _ALPHA_FLOOR, 0.0, rim).astype(np.float32)
    darkness = (0.35 + 0.55 * spec.contrast) * (1.0 - 0.3 * np.clip(q, 0, 1))[:, :, None]
    out = img + rim[:, :, None] * 45.0 * spec.contrast  # raised rim
    out = out + core[:, :, None] * (img * (1.0 - darkness) - out)  # dark interior
    alpha = np.maximum(core, rim).astype(np.float32)  # continuous: no gap between core and rim
    safe = np.where(alpha > 0, alpha, 1.0)[:, :, None]
    return img + (out - img) / safe, alpha


def _stain(rng, img, spec: _Spec, ctx) -> tuple[np.ndarray, np.ndarray]:
    """Soft irregular blob (union of cones) blending the surface towards a stain colour (rust, dust, oil, coolant)."""
    yy, xx = _grid(img.shape[0])
    field = np.zeros(img.shape[:2], np.float32)
    for _ in range(int(rng.integers(3, 7))):
        oy, ox = rng.normal(0.0, spec.radius * 0.45, 2)
        rad = spec.radius * rng.uniform(0.45, 0.85)
        field = np.maximum(field, 1.0 - np.hypot(yy - spec.cy - oy, xx - spec.cx - ox) / rad)
    alpha = _smoothstep(field / rng.uniform(0.3, 0.8))
    tint = _STAIN_TINTS[rng.integers(len(_STAIN_TINTS))]
    strength = 0.35 + 0.6 * spec.contrast
    return img * (1.0 - strength) + strength * 200.0 * tint, alpha


def _star_polygon(rng, spec: _Spec) -> list[tuple[float, float]]:
    """Random star-shaped polygon around the centre, vertices as (x, y)."""
    n = int(rng.integers(5, 10))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = spec.radius * rng.uniform(0.6, 1.1, n)
    return [(spec.cx + r * np.cos(a), spec.cy + r * np.sin(a)) for a, r in zip(ang, rad)]


def _foreign(rng, img, spec: _Spec, ctx) -> tuple[np.ndarray, np.ndarray]:
    """Hard-edged patch of a different (tinted) texture, brightness shifted by the contrast."""
    size = img.shape[0]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(_star_polygon(rng, spec), fill=255)
    alpha = np.asarray(canvas, np.float32) / 255.0
    choices = sorted(n for n in _photos() if n != ctx.get("photo"))
    gray = _texture_gray(rng, _photos()[choices[rng.integers(len(choices))]], size)
    patch = gray[:, :, None] * rng.uniform(0.5, 1.1, 3).astype(np.float32)
    region = alpha > 0
    if not region.any():
        return img, alpha
    sign = 1.0 if rng.random() < 0.5 else -1.0
    want = img[region].mean(0) + sign * (10.0 + 70.0 * spec.contrast)
    patch = patch - patch[region].mean(0) + want
    return patch, alpha


_DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "foreign": _foreign}


def _apply_defect(
    rng: np.random.Generator, defect: str, img: np.ndarray, allowed: np.ndarray | None, category: str,
    defect_px: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one defect. Returns (image float32 [S,S,3], mask bool [S,S] == changed region)."""
    texture = TEXTURES.get(category) or EXTRA_TEXTURES.get(category)
    ctx = {"photo": texture[0] if texture else None}
    for _ in range(50):
        spec = _draw_spec(rng, img.shape[0], allowed, defect_px)
        target, alpha = _DEFECTS[defect](rng, img, spec, ctx)
        alpha = np.where(alpha < _ALPHA_FLOOR, 0.0, alpha).astype(np.float32)
        if allowed is not None:
            alpha = alpha * allowed
        mask = alpha > 0
        if mask.sum() >= _MIN_MASK_PX:
            out = img + alpha[:, :, None] * (np.clip(target, 0.0, 255.0) - img)
            return out, mask
    raise RuntimeError(f"could not place a {defect} defect on {category}")  # pragma: no cover


def render_sample(
    seed: int, category: str, key: str, defect: str | None, size: int,
    defect_px: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one demo image deterministically from (seed, category, key).

    Returns:
        (clean uint8 [S,S,3], image uint8 [S,S,3], mask bool [S,S]); for ``defect=None``
        image == clean and the mask is all False.
    """
    if category not in AVAILABLE_CATEGORIES:
        raise ConfigError(f"unknown demo category {category!r}; available: {AVAILABLE_CATEGORIES}")
    rng = _rng(seed, "demo", category, key)
    clean, allowed = _normal_image(rng, category, size)
    clean_u8 = np.round(clean).astype(np.uint8)
    if defect is None:
        return clean_u8, clean_u8, np.zeros((size, size), bool)
    out, mask = _apply_defect(rng, defect, clean_u8.astype(np.float32), allowed, category, defect_px)
    return clean_u8, np.round(np.clip(out, 0, 255)).astype(np.uint8), mask


# ---------------------------------------------------------------------------- writing


def _save_png(arr: np.ndarray, path: Path) -> None:
    """Deterministic PNG (no timestamps); low compression for speed."""
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _n_workers() -> int:
    """Threads for rendering/encoding (numpy and zlib release the GIL); at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _category_jobs(root: Path, category: str, counts: dict[str, int]) -> list[tuple[str, str, str, int]]:
    """(category, split, kind, index) per image; (re)creates the category's directories."""
    cat_dir = root / category
    if cat_dir.exists():
        shutil.rmtree(cat_dir)
    groups = [("train", "good", counts["train"]), ("test", "good", counts["test_good"])]
    groups += [("test", d, counts["defect"]) for d in DEFECT_TYPES]
    jobs = []
    for split, kind, n in groups:
        (cat_dir / split / kind).mkdir(parents=True, exist_ok=True)
        if kind != "good":
            (cat_dir / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        jobs += [(category, split, kind, i) for i in range(n)]
    return jobs


def _write_image(root: Path, seed: int, size: int, job: tuple[str, str, str, int],
                 defect_px: tuple[float, float] | None = None) -> None:
    """Render and write one image (and its mask for defect images)."""
    category, split, kind, i = job
    defect = None if kind == "good" else kind
    _, img, mask = render_sample(seed, category, f"{split}/{kind}/{i}", defect, size, defect_px)
    _save_png(img, root / category / split / kind / f"{i:03d}.png")
    if defect is not None:
        _save_png(mask.astype(np.uint8) * 255, root / category / "ground_truth" / kind / f"{i:03d}_mask.png")


def generate_demo(
    root: Path,
    seed: int,
    categories: list[str] | None = None,
    n_train: int = 24,
    n_test_good: int = 16,
    n_test_defect_per_type: int = 6,
    size: int = 256,
    defect_px: tuple[float, float] | None = None,
) -> list[str]:
    """Write a synthetic MVTec-AD layout tree under ``root`` (byte-identical for equal args).

    Existing ``root/<category>`` directories are replaced. Images are ``size x size`` RGB PNGs,
    masks 0/255 grayscale PNGs named ``<stem>_mask.png``. ``defect_px=(lo, hi)`` draws small defects of a
    width in [lo, hi] px whatever ``size`` (the high-resolution tree of the tiling benchmark: size 1024, (4, 16)).

    Returns:
        the category names written.
    """
    cats = list(DEFAULT_CATEGORIES if categories is None else categories)
    for cat in cats:
        if cat not in AVAILABLE_CATEGORIES:
            raise ConfigError(f"unknown demo category {cat!r}; available: {AVAILABLE_CATEGORIES}")
    if size < 32:
        raise ConfigError(f"demo image size must be >= 32, got {size}")
    if min(n_train, n_test_good, n_test_defect_per_type) < 0:
        raise ConfigError("demo image counts must be non-negative")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "test_good": n_test_good, "defect": n_test_defect_per_type}
    jobs = [job for cat in cats for job in _category_jobs(root, cat, counts)]
    _photos()  # load once before the worker threads start
    if any(c in EXTRA_TEXTURES for c in cats):
        _extra_photos()
    # every image has its own Generator, so the thread schedule cannot change the output
    with ThreadPoolExecutor(max_workers=_n_workers()) as pool:
        list(pool.map(lambda job: _write_image(root, seed, size, job, defect_px), jobs))
    return cats
