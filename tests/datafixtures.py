"""Tiny raw data sets in every source format, and tiny shard sets, built inside the tests (no download)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from livt_ds.data.make_shards import write_shards
from livt_ds.data.pipeline import StreamPosition
from livt_ds.data.sources import Record, Source


def image_bytes(seed: int, size: tuple[int, int] = (16, 16), fmt: str = "PNG") -> bytes:
    """A small random-ish RGB image (class-independent content), encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=3)
    noise = rng.integers(-40, 40, size=(h, w, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_image(path: Path, seed: int, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix.lower()]
    path.write_bytes(image_bytes(seed, size, fmt))
    return path


def write_corrupt(path: Path) -> Path:
    """A file named like an image whose bytes are a truncated JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(999, (32, 32), "JPEG")[:60])
    return path


def make_imagefolder(root: Path, counts: dict[str, tuple[int, int]], *, ext: str = ".jpg") -> Path:
    """``root/{train,val}/CLASS/i.ext`` with ``counts[CLASS] = (train, val)`` images."""
    seed = 0
    for name, (n_train, n_val) in counts.items():
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                seed += 1
                write_image(root / split / name / f"img{i}{ext}", seed)
    return root


def make_list_source(root: Path, rows: dict[str, list[tuple[str, int]]]) -> dict[str, Path]:
    """Images under ``root/images`` for every listed path, and ``root/{split}.txt`` list files."""
    files = {}
    for split, entries in rows.items():
        lines = []
        for i, (rel, label) in enumerate(entries):
            write_image(root / "images" / rel, 100 * len(split) + i)
            lines.append(f"{rel} {label}")
        files[split] = root / f"{split}.txt"
        files[split].write_text("\n".join(lines) + "\n")
    return files


def make_inat(root: Path, cat_ids: list[int], per_class: dict[str, int]) -> dict[str, Path]:
    """COCO-style train/val JSONs (categories with the given ids) and images under ``root/images``."""
    files = {}
    image_id = 1000
    for split, n in per_class.items():
        images, annotations = [], []
        for cat in cat_ids:
            for _ in range(n):
                image_id += 1
                rel = f"{split}_val2018/cat{cat}/{image_id}.jpg"
                write_image(root / "images" / rel, image_id)
                images.append({"id": image_id, "file_name": rel, "width": 16, "height": 16})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": cat})
        doc = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": f"species_{c}"} for c in sorted(cat_ids)],
        }
        files[split] = root / f"{split}2018.json"
        files[split].write_text(json.dumps(doc))
    return files


def make_cifar10(root: Path, per_class_train: int, per_class_test: int, num_classes: int = 10) -> Path:
    """CIFAR-10-style pickles: 5 ``data_batch_i`` + ``test_batch`` + ``batches.meta`` (random 32x32 pixels)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = [c for c in range(num_classes) for _ in range(per_class_train)]
    rng.shuffle(labels)
    for b, chunk in enumerate(np.array_split(np.array(labels), 5), 1):
        _dump(root / f"data_batch_{b}", {b"data": _pixels(rng, len(chunk)), b"labels": [int(v) for v in chunk]})
    test = [c for c in range(num_classes) for _ in range(per_class_test)]
    _dump(root / "test_batch", {b"data": _pixels(rng, len(test)), b"labels": test})
    _dump(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(num_classes)]})
    return root


def make_cifar100(root: Path, per_class_train: int, per_class_test: int, num_classes: int = 5) -> Path:
    """CIFAR-100-style pickles (``train``, ``test``, ``meta`` with fine labels), a few classes only."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", per_class_train), ("test", per_class_test)):
        labels = [c for c in range(num_classes) for _ in range(n)]
        _dump(root / name, {b"data": _pixels(rng, len(labels)), b"fine_labels": labels, b"coarse_labels": labels})
    _dump(root / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(num_classes)]})
    return root


def _pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def memory_source(n_train: int, n_val: int = 0, *, num_classes: int = 4, size: int = 16) -> Source:
    """A Source of inline PNG records (labels cycling through the classes) for fast shard-set fixtures."""
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        if n:
            offset = 0 if split == "train" else 10**6
            splits[split] = [
                Record(i % num_classes, f"{split}{i}", data=image_bytes(i + offset, (size, size))) for i in range(n)
            ]
    return Source("list", [f"k{i}" for i in range(num_classes)], splits, args={"input": f"memory-{n_train}-{n_val}"})


def make_shard_set(path: Path, n_train: int, per_shard: int, *, n_val: int = 0, num_classes: int = 4) -> Path:
    """A shard set of ``n_train`` (+ ``n_val``) 16-px images, ``per_shard`` samples per tar file."""
    source = memory_source(n_train, n_val, num_classes=num_classes)
    write_shards(source, path, shard_size=str(per_shard), progress=False)
    return path


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite tar ``path`` member by member through ``edit(name, data) -> bytes | None`` (None drops it)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            new = edit(member.name, data)
            if new is None:
                continue
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))


def loader_position(kw: dict) -> StreamPosition:
    """The StreamPosition named by the loader keyword arguments the data tests use (removed from ``kw``)."""
    return StreamPosition(seed=kw.pop("seed"), epoch=kw.pop("epoch"), rank=kw.pop("rank"), world=kw.pop("world_size"),
                          workers=kw.pop("num_workers"), batches=kw.pop("num_batches"), skip=kw.pop("skip_batches", 0))
