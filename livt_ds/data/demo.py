"""The built-in long-tailed demo data set: generated, deterministic, no download.

Each class is a combination of (colour scheme, texture, shape), e.g. ``red_striped_circle``, drawn with
intra-class variation: position, scale, rotation, texture phase/period, colour jitter, lighting, a noisy
cluttered background and up to two smaller distractor objects with random attributes (the class is the
largest object).

Design rule (as in natural images, what the frequent classes teach must be what the rare classes need):
every cue value that separates a rare class from another class (e.g. square vs triangle, red vs green,
solid vs dotted) also separates some pair of frequent classes (many- or medium-shot, >= 20 images), and
shape, colour and texture are each *needed* among the head: the many-shot classes 1, 2 and 3 each differ
from the head class 0 in one cue only (shape, colour, texture). So a representation that can tell the head
classes apart holds every cue the few-shot classes are made of; a few-shot class is a new combination of
known cues. ``check_design_rule`` tests the rule on the class table (and the unit tests call it).

Images are rendered with numpy at 2x and box-downsampled (anti-aliasing), then PNG-encoded by a small
writer that uses stored (uncompressed) deflate blocks, so the bytes do not depend on the zlib build:
the same ``seed`` gives byte-identical files on any machine.

Training split: exponential profile ``n_i = int(n_max * gamma ** (-i / (C - 1)))``, class 0 the head
(500 ... 5 images, 1,236 in all); the val split is balanced (100 per class).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator

import numpy as np

from livt_ds.data.longtail import exponential_profile, shot_groups

DEMO_IMAGE_SIZE = 32
DEMO_GAMMA = 100.0
DEMO_N_MAX = 500
DEMO_VAL_PER_CLASS = 100
DEMO_SPLITS = ("train", "val")

# (colour scheme, texture, shape) per class, head -> tail (500, 299, 179, 107 | 64, 38, 23 | 13, 8, 5 images).
# Many-shot 0-3: one-cue twins of class 0 in shape (1), colour (2) and texture (3). Medium 4-6 add the third
# value of each cue, so every pair of values of each cue separates two frequent classes. Few-shot 7-9 are new
# combinations of those values (see the design rule in the module docstring).
_CLASS_ATTRS: tuple[tuple[str, str, str], ...] = (
    ("red", "striped", "circle"),
    ("red", "striped", "square"),
    ("blue", "striped", "circle"),
    ("red", "dotted", "circle"),
    ("green", "solid", "triangle"),
    ("blue", "dotted", "triangle"),
    ("green", "striped", "square"),
    ("blue", "solid", "square"),
    ("green", "dotted", "circle"),
    ("red", "solid", "triangle"),
)
DEMO_CLASSES: list[str] = ["_".join(attrs) for attrs in _CLASS_ATTRS]
DEMO_NUM_CLASSES = len(DEMO_CLASSES)

# Colour schemes: (primary, secondary) RGB; textures alternate the two.
_SCHEMES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((205, 35, 35), (250, 212, 200)),
    "green": ((35, 160, 55), (210, 250, 195)),
    "blue": ((40, 70, 210), (195, 215, 255)),
}
_SHAPES = ("circle", "square", "triangle")
_TEXTURES = ("solid", "striped", "dotted")
_SUPERSAMPLE = 2
_SPLIT_IDS = {"train": 1, "val": 2}


def demo_class_counts(split: str) -> list[int]:
    """Images per class of ``split``: the long-tail profile for "train", ``DEMO_VAL_PER_CLASS`` each for "val"."""
    _check_split(split)
    if split == "val":
        return [DEMO_VAL_PER_CLASS] * DEMO_NUM_CLASSES
    return exponential_profile(DEMO_N_MAX, DEMO_NUM_CLASSES, DEMO_GAMMA)


def check_design_rule() -> None:
    """Raise ValueError unless the class table follows the design rule of the module docstring."""
    groups = shot_groups(demo_class_counts("train"))  # "frequent" classes of the rule: many- and medium-shot
    frequent = [_CLASS_ATTRS[i] for i in sorted(groups["many"] + groups["medium"])]
    rare = [_CLASS_ATTRS[i] for i in groups["few"]]
    cues = ("colour", "texture", "shape")
    taught = [{frozenset((a[k], b[k])) for a in frequent for b in frequent if a[k] != b[k]} for k in range(3)]
    for r in rare:
        for other in _CLASS_ATTRS:
            for k, cue in enumerate(cues):
                if r[k] != other[k] and frozenset((r[k], other[k])) not in taught[k]:
                    raise ValueError(f"demo classes: {cue} {r[k]} vs {other[k]} separates {'_'.join(r)} from "
                                     f"{'_'.join(other)} but no pair of frequent classes")
    head = [_CLASS_ATTRS[i] for i in groups["many"]]
    for k, cue in enumerate(cues):
        if not any(sum(x != y for x, y in zip(a, b, strict=True)) == 1 and a[k] != b[k] for a in head for b in head):
            raise ValueError(f"demo classes: no two many-shot classes differ in {cue} alone")


def demo_samples(split: str, seed: int = 0, image_size: int = DEMO_IMAGE_SIZE) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(key, png_bytes, label)`` for every image of ``split`` in a fixed, class-mixed order.

    Keys look like ``train_000123`` (no dots, as WebDataset requires). The order is shuffled with ``seed``
    so that consecutive shards hold all classes; image ``j`` of class ``c`` depends only on
    ``(seed, split, c, j, image_size)``. An unknown split raises ValueError at the call, not at iteration.
    """
    _check_args(split, seed, image_size)
    return ((key, encode_png(image), label) for key, image, label in _iter_split(split, seed, image_size))


def demo_arrays(split: str, seed: int = 0, image_size: int = DEMO_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The same images as ``demo_samples`` without PNG: uint8 ``[N, H, W, 3]`` and int64 labels ``[N]``."""
    images, labels = [], []
    for _, image, label in _iter_split(split, seed, image_size):
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def render_demo_image(label: int, rng: np.random.Generator, image_size: int = DEMO_IMAGE_SIZE) -> np.ndarray:
    """Render one image of class ``label`` with randomness from ``rng``: uint8 ``[H, W, 3]``."""
    if not 0 <= label < DEMO_NUM_CLASSES:
        raise ValueError(f"demo label {label} out of range: valid labels are 0..{DEMO_NUM_CLASSES - 1}")
    if image_size < 8:
        raise ValueError(f"demo image_size {image_size} too small: use 8 or more (default {DEMO_IMAGE_SIZE})")
    side = image_size * _SUPERSAMPLE
    coords = (np.arange(side, dtype=np.float64) + 0.5) / side
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    canvas = _background(rng, xx, yy)
    radius = rng.uniform(0.24, 0.34)
    for _ in range(int(rng.choice(3, p=[0.4, 0.4, 0.2]))):
        attrs = (rng.choice(list(_SCHEMES)), rng.choice(_TEXTURES), rng.choice(_SHAPES))
        _draw_object(canvas, rng, xx, yy, attrs, radius * rng.uniform(0.25, 0.45), margin=0.0)
    _draw_object(canvas, rng, xx, yy, _CLASS_ATTRS[label], radius, margin=0.9 * radius)
    small = canvas.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    small += rng.normal(0.0, rng.uniform(3.0, 10.0), size=small.shape)
    return np.clip(np.floor(small + 0.5), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 3]`` image, with stored deflate blocks (zlib-build independent)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_png needs a uint8 [H, W, 3] array, got {image.dtype} {tuple(image.shape)}")
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)
    raw = rows.tobytes()  # filter type 0 (none) in front of each row
    blocks = []
    for start in range(0, max(len(raw), 1), 65535):
        chunk = raw[start : start + 65535]
        final = 1 if start + 65535 >= len(raw) else 0
        blocks.append(struct.pack("<BHH", final, len(chunk), 0xFFFF ^ len(chunk)) + chunk)
    stream = b"\x78\x01" + b"".join(blocks) + struct.pack(">I", zlib.adler32(raw))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"demo split {split!r} unknown: use one of {list(DEMO_SPLITS)}")


def _check_args(split: str, seed: int, image_size: int) -> None:
    _check_split(split)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"demo seed {seed!r} invalid: use a non-negative integer")
    if image_size < 8:
        raise ValueError(f"demo image_size {image_size} too small: use 8 or more (default {DEMO_IMAGE_SIZE})")


def _iter_split(split: str, seed: int, image_size: int) -> Iterator[tuple[str, np.ndarray, int]]:
    _check_args(split, seed, image_size)
    split_id = _SPLIT_IDS[split]
    items = [(c, j) for c, n in enumerate(demo_class_counts(split)) for j in range(n)]
    order = np.random.default_rng([seed, split_id]).permutation(len(items))
    for position, index in enumerate(order):
        label, j = items[int(index)]
        rng = np.random.default_rng([seed, split_id, label, j])
        yield f"{split}_{position:06d}", render_demo_image(label, rng, image_size), label


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Tinted grey with a linear gradient and 2-5 low-contrast blobs/bars: float ``[S, S, 3]`` in 0..255."""
    base = rng.uniform(50, 200) + rng.uniform(-30, 30, size=3)
    slope = rng.uniform(-60, 60, size=2)
    canvas = base + (slope[0] * (xx - 0.5) + slope[1] * (yy - 0.5))[..., None]
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, 1, size=2)
        angle = rng.uniform(0, math.pi)
        u, v = _rotate(xx - cx, yy - cy, angle)
        if rng.random() < 0.5:
            ra, rb = rng.uniform(0.05, 0.25, size=2)
            mask = (u / ra) ** 2 + (v / rb) ** 2 <= 1.0
        else:
            mask = np.abs(v) <= rng.uniform(0.01, 0.03)
        colour = np.clip(base + rng.uniform(-45, 45, size=3), 0, 255)
        canvas[mask] = 0.4 * canvas[mask] + 0.6 * colour
    return canvas


def _draw_object(
    canvas: np.ndarray,
    rng: np.random.Generator,
    xx: np.ndarray,
    yy: np.ndarray,
    attrs: tuple[str, str, str],
    radius: float,
    margin: float,
) -> None:
    """Paint one (scheme, texture, shape) object of ``radius`` (image units) in place onto ``canvas``."""
    scheme, texture, shape = attrs
    cx, cy = rng.uniform(margin, 1.0 - margin, size=2)
    u, v = _rotate(xx - cx, yy - cy, rng.uniform(0, 2 * math.pi))
    u, v = u / radius, v / radius  # local units: the shape spans about [-1, 1]
    mask = _shape_mask(shape, u, v)
    primary, secondary = (np.asarray(c, dtype=np.float64) for c in _SCHEMES[scheme])
    gain, shift = rng.uniform(0.75, 1.15), rng.uniform(-25, 25, size=3)
    primary, secondary = primary * gain + shift, secondary * gain + shift
    pattern = _texture_mask(texture, rng, u, v)
    colour = np.where(pattern[..., None], secondary, primary)
    light = 1.0 + 0.12 * (rng.uniform(-1, 1) * u + rng.uniform(-1, 1) * v)
    canvas[mask] = np.clip(colour[mask] * light[mask][:, None], 0, 255)


def _rotate(dx: np.ndarray, dy: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = math.cos(angle), math.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.88
    # equilateral triangle, circumradius 1.4, centroid at the origin
    return (v >= -0.7) & (v <= 1.4 - math.sqrt(3.0) * np.abs(u))


def _texture_mask(texture: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the secondary colour goes (bool, same shape as ``u``); phase and period vary per object."""
    period = rng.uniform(0.55, 0.7)
    pu, pv = rng.uniform(0, 1, size=2)
    if texture == "solid":
        return np.zeros(u.shape, dtype=bool)
    if texture == "striped":
        return np.mod(u / period + pu, 1.0) < 0.5
    du = np.mod(u / period + pu, 1.0) - 0.5  # dotted: a square grid of discs
    dv = np.mod(v / period + pv, 1.0) - 0.5
    return du * du + dv * dv <= 0.32**2
