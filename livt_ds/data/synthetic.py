"""Photo-like synthetic JPEGs, image folders and shard sets for the benchmarks (no download).

The images are smooth colour fields at three scales, a few soft blobs and sensor noise: they decode and
compress like photographs (about 60 KB at 500x375, quality 90), which is what an input-pipeline benchmark
needs; their content carries no class signal (the demo data set, ``livt_ds.data.demo``, is the learnable one).
Image ``i`` depends only on ``(seed, i)``, so a folder is the same whatever the number of worker processes.
"""

from __future__ import annotations

import io
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from livt_ds.data.make_shards import main as make_shards


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image of ``width`` x ``height`` with photo-like spectra, drawn from ``rng``."""
    img = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 0.5), (12, 0.25), (48, 0.12)):
        grid = rng.random((cells, cells, 3)).astype(np.float32)
        small = Image.fromarray((grid * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        img += weight * np.asarray(small, np.float32) / 255
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(2, 6)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 90)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - 0.6 * blob) + 0.6 * blob * rng.random(3)
    img += rng.normal(0, 0.03, img.shape)
    return Image.fromarray((np.clip(img / img.max(), 0, 1) * 255).astype(np.uint8))


def photo_jpeg(seed: int, index: int, size: tuple[int, int], jitter: tuple[int, int] = (0, 0),
               quality: int = 90) -> bytes:
    """JPEG bytes of image ``index``: ``size`` = (W, H), each side drawn uniformly within +-``jitter``."""
    if min(s - j for s, j in zip(size, jitter, strict=True)) < 1:
        raise ValueError(f"image size {size} with jitter {jitter} can give sides below 1 px: use larger sides")
    rng = np.random.default_rng([seed, index])
    w, h = (int(rng.integers(s - j, s + j + 1)) if j else s for s, j in zip(size, jitter, strict=True))
    buf = io.BytesIO()
    photo_like(rng, w, h).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _job(args: tuple[int, int, tuple[int, int], tuple[int, int]]) -> bytes:
    return photo_jpeg(*args)


def write_image_folder(root: Path, images: int, *, size: tuple[int, int], classes: int,
                       jitter: tuple[int, int] = (0, 0), seed: int = 0, workers: int = 1) -> Path:
    """``root/train/cNNNN/NNNNNN.jpg``: ``images`` JPEGs, labels round-robin over ``classes``; returns ``root``.

    ``workers`` > 1 encodes in a process pool (image content does not depend on it)."""
    if images < 1 or classes < 1:
        raise ValueError(f"write_image_folder: images={images} and classes={classes} must be >= 1")
    jobs = [(seed, i, size, jitter) for i in range(images)]
    if workers > 1:
        with Pool(workers) as pool:
            blobs = pool.map(_job, jobs, chunksize=32)
    else:
        blobs = [_job(job) for job in jobs]
    for i, blob in enumerate(blobs):
        folder = root / "train" / f"c{i % classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(blob)
    return root


def generate_shards(output: Path, *, images: int, size: tuple[int, int], classes: int, workers: int) -> Path:
    """Write ``images`` JPEGs of ``size`` = (W, H) as an image folder under ``output/raw`` and shard it to
    ``output/shards`` with make_shards (about ``2 * workers`` train shards); returns the shard set folder."""
    raw, shards = output / "raw", output / "shards"
    workers = max(1, workers)
    write_image_folder(raw, images, size=size, classes=classes, workers=workers)
    per_shard = max(4, images // max(2, 2 * workers))
    code = make_shards(["--source", "imagefolder", "--input", str(raw), "--output", str(shards),
                        "--shard-size", str(per_shard), "--workers", str(workers), "--no-progress",
                        "--stats-samples", "64"])
    if code != 0:
        raise RuntimeError(f"make_shards failed with status {code} on the generated image folder {raw}")
    return shards
