"""``scripts/make_shards.py`` / ``livt shard``: raw data set -> WebDataset shards + meta.json, and ``--verify``.

    python scripts/make_shards.py --source {imagefolder,list,inat,cifar,demo} --input PATH --output shards/NAME
        [--train-list F --val-list F --test-list F] [--val-per-class N] [--imbalance GAMMA] [--max-side N]
        [--shard-size N|SIZE] [--workers N]
        [--seed S] [--skip-missing] [--overwrite] [--num-classes N]
    python scripts/make_shards.py --verify shards/NAME
    python scripts/make_shards.py ... --output s3://bucket/sets/NAME     (or gs://, or 'pipe:CMD {}' reading stdin)
    python scripts/make_shards.py --verify https://host/sets/NAME        (or s3://, gs://, 'pipe:CMD {}')

Flow: index the source (no image read yet), fail on missing files unless ``--skip-missing``, subsample the
training split onto the ``--imbalance`` profile, shuffle its order (so every shard holds a class mix),
then encode in an ordered worker pool (deterministic output whatever ``--workers``) and write through
:class:`~livt_ds.data.shards.ShardSetWriter` (atomic). Corrupt images are skipped, counted and listed.
An ``--output`` URL is written to a local temporary folder first (``TMPDIR``), then uploaded with meta.json
last (:func:`~livt_ds.data.shards.upload_shard_set`).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from livt_ds.data.longtail import imbalance_ratio, longtail_subsample
from livt_ds.data.remote import is_credentials_error, is_url
from livt_ds.data.shards import (
    FORMAT_VERSION,
    ShardSetError,
    ShardSetWriter,
    check_output,
    parse_shard_size,
    upload_shard_set,
    verify_shards,
)
from livt_ds.data.sources import SOURCE_KINDS, Record, Source, SourceError, load_record_bytes, open_source

STATS_SIDE = 128  # mean/std are measured on images box-reduced to about this longer side
MISSING_SHOWN = 5


@dataclass
class Encoded:
    """One record after the worker: the bytes to store, or why it was skipped.

    ``stats``: ``[3, 3]`` float64 rows (per-channel sum, sum of squares, pixel count) on the 0-1 scale,
    only for the records that sample the mean/std.
    """

    index: int
    ext: str = ""
    data: bytes = b""
    size: tuple[int, int] = (0, 0)
    orig_size: tuple[int, int] | None = None
    reason: str = ""
    stats: np.ndarray | None = None


def encode_record(job: tuple[int, Record, int | None, bool]) -> Encoded:
    """Read, fully decode (to catch truncated files), maybe downscale, and choose the stored encoding."""
    index, record, max_side, want_stats = job
    try:
        raw = load_record_bytes(record)
    except OSError as exn:
        return Encoded(index, reason=f"unreadable: {exn}")
    try:
        img = Image.open(io.BytesIO(raw))
        fmt = img.format
        img.load()
        ext, data, orig = _stored_encoding(img, fmt, raw, max_side)
        stats = _channel_sums(img) if want_stats else None
    except Exception as exn:  # PIL raises many types for corrupt data; each one means "skip this image"
        return Encoded(index, reason=f"cannot decode: {type(exn).__name__}: {exn}")
    size = img.size if orig is None else Image.open(io.BytesIO(data)).size
    return Encoded(index, ext, data, size, orig, stats=stats)


def _stored_encoding(
    img: Image.Image, fmt: str | None, raw: bytes, max_side: int | None
) -> tuple[str, bytes, tuple[int, int] | None]:
    """(extension, bytes, original size if resized): JPEG/PNG bytes as they are unless too large.

    Larger than ``max_side``: downscaled (aspect kept), JPEG q95 for JPEG inputs, PNG otherwise.
    Other formats (BMP, WebP, TIFF, GIF...) are re-encoded losslessly as PNG.
    """
    is_jpeg = fmt in ("JPEG", "MPO")
    w, h = img.size
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if is_jpeg:
            small = _mode_for(img, ("RGB", "L", "CMYK"), "RGB").resize(new_size, Image.Resampling.BICUBIC)
            return "jpg", _save(small, "JPEG", quality=95), (w, h)
        small = _mode_for(img, ("RGB", "RGBA", "L", "LA"), "RGBA").resize(new_size, Image.Resampling.BICUBIC)
        return "png", _save(small, "PNG"), (w, h)
    if is_jpeg:
        return "jpg", raw, None
    if fmt == "PNG":
        return "png", raw, None
    return "png", _save(_mode_for(img, ("1", "L", "LA", "I", "P", "RGB", "RGBA"), "RGBA"), "PNG"), None


def _mode_for(img: Image.Image, allowed: tuple[str, ...], fallback: str) -> Image.Image:
    if img.mode in allowed:
        return img
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    return img.convert(fallback if has_alpha else "RGB")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _channel_sums(img: Image.Image) -> np.ndarray:
    """Per-channel (sum, sum of squares, count) of an RGB version box-reduced to about STATS_SIDE, ``[3, 3]``."""
    rgb = img.convert("RGB")
    factor = max(1, max(rgb.size) // STATS_SIDE)
    if factor > 1:
        rgb = rgb.reduce(factor)
    x = np.asarray(rgb, dtype=np.float64).reshape(-1, 3) / 255.0
    return np.stack([x.sum(0), (x * x).sum(0), np.full(3, float(len(x)))])


# ---------------------------------------------------------------------------------------------- writing
def write_shards(
    source: Source,
    output: str | Path,
    *,
    imbalance: float | None = None,
    max_side: int | None = None,
    shard_size: str | int = "1000",
    workers: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    skip_missing: bool = False,
    command: str | None = None,
    progress: bool = True,
    stats_samples: int = 1000,
) -> dict:
    """Write ``source`` as a shard set at ``output`` and return its meta.json contents.

    Raises SourceError / ShardSetError (with what to do) on missing files, an empty source, or an output
    folder that holds another data set (or this one, without ``overwrite``).
    """
    output = Path(output)
    check_output(output, {"source": source.kind, "input": source.args.get("input")}, overwrite)
    tally = _Tally(skipped=_missing_as_skipped(source, skip_missing))
    splits = _plan_splits(source, imbalance, seed)
    maxcount, maxsize = parse_shard_size(shard_size)
    with ShardSetWriter(output, maxcount=maxcount, maxsize=maxsize, overwrite=overwrite) as writer:
        for split, records in splits.items():
            writer.start_split(split)
            want = stats_samples if split == "train" else 0
            jobs = [(i, r, max_side, i < want) for i, r in enumerate(records)]
            for enc in _encode_all(jobs, workers, desc=f"{output.name}/{split}", progress=progress):
                record = records[enc.index]
                if enc.reason:
                    tally.skipped.append(_skip_entry(split, record, enc.reason))
                    continue
                info = {"src": record.name} | ({"orig_size": list(enc.orig_size)} if enc.orig_size else {})
                writer.write(f"{split}_{enc.index:08d}", enc.data, enc.ext, record.label, info)
                tally.add(enc)
        if not writer.stats.get("train") or not writer.stats["train"].shards:
            raise SourceError(f"{output}: no decodable training image (skipped {len(tally.skipped)}); check the input")
        meta = _build_meta(source, output, writer.stats, tally)
        meta.update(seed=seed, imbalance=imbalance, max_side=max_side, shard_size=str(shard_size))
        meta["command"] = command or ""
        writer.record_files(meta)
        writer.commit(meta)
    return meta


def write_and_upload(source: Source, url: str, *, overwrite: bool = False, **options) -> dict:
    """:func:`write_shards` into a local temporary folder, then upload it to ``url`` (tar files first, meta.json
    last); returns meta.json's contents. The temporary folder is removed either way."""
    if url.startswith(("http://", "https://")):
        raise ShardSetError(f"--output {url}: uploading over http(s) is not supported; write to a local --output and "
                            "copy the folder with your storage's tool (meta.json last), or give s3://, gs:// or "
                            "'pipe:COMMAND {}'")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="livt-shards-") as tmp:
        local = Path(tmp) / _set_name(url)
        meta = write_shards(source, local, overwrite=False, **options)
        upload_shard_set(local, url, overwrite=overwrite, progress=options.get("progress", True))
    return meta


def _set_name(url: str) -> str:
    """The set's name (meta.json ``name``) from its URL: the last path part before ``{}`` / the end."""
    head = url.split("{}", 1)[0].rstrip("/")
    parts = re.findall(r"[A-Za-z0-9_.-]+", head.rsplit("/", 1)[-1])
    if not parts:
        raise ShardSetError(f"--output {url}: cannot tell the set's name; end the URL with /NAME (or /NAME/{{}})")
    return parts[-1]


@dataclass
class _Tally:
    """Running totals over the written images: sizes, formats, mean/std sums, and the skipped list."""

    skipped: list[dict]
    sizes: list[tuple[int, int]] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    resized: int = 0
    stats: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    stats_images: int = 0

    def add(self, enc: Encoded) -> None:
        self.sizes.append(enc.size)
        self.formats[enc.ext] += 1
        self.resized += enc.orig_size is not None
        if enc.stats is not None:
            self.stats += enc.stats
            self.stats_images += 1


def _missing_as_skipped(source: Source, skip_missing: bool) -> list[dict]:
    missing = [(split, p) for split, paths in source.missing.items() for p in paths]
    if missing and not skip_missing:
        shown = "\n  ".join(p for _, p in missing[:MISSING_SHOWN])
        raise SourceError(
            f"{len(missing)} files named by the {source.kind} source are missing, e.g.\n  {shown}\n"
            "check --input (the image root the lists are relative to), or pass --skip-missing to write the rest"
        )
    return [{"split": split, "path": p, "reason": "missing"} for split, p in missing]


def _plan_splits(source: Source, imbalance: float | None, seed: int) -> dict[str, list[Record]]:
    """Training records subsampled onto the profile and shuffled with ``seed``; val and test kept as they are."""
    train = list(source.splits["train"])
    if not train:
        raise SourceError(f"{source.kind} source: the training split is empty after removing missing files")
    if imbalance is not None:
        kept = longtail_subsample([r.label for r in train], source.num_classes, imbalance, seed)
        train = [train[i] for i in kept]
    random.Random(seed).shuffle(train)
    plan = {"train": train}
    for split in ("val", "test"):
        if source.splits.get(split):
            plan[split] = list(source.splits[split])
    return plan


def _encode_all(jobs: list, workers: int, *, desc: str, progress: bool) -> Iterator[Encoded]:
    """Encoded results in job order (``imap`` keeps order, so the shards do not depend on ``workers``)."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers > 1 and len(jobs) > 1:
            with Pool(min(workers, len(jobs))) as pool:
                yield from _ticked(pool.imap(encode_record, jobs, chunksize=16), bar)
        else:
            yield from _ticked(map(encode_record, jobs), bar)
    finally:
        bar.close()


def _ticked(results: Iterable[Encoded], bar: tqdm) -> Iterator[Encoded]:
    for r in results:
        bar.update(1)
        yield r


def _skip_entry(split: str, record: Record, reason: str) -> dict:
    where = {"path": record.path} if record.path is not None else {"key": record.name}
    return {"split": split, **where, "reason": reason}


def _build_meta(source: Source, output: Path, split_stats: dict, tally: _Tally) -> dict:
    num_classes = source.num_classes
    splits = {}
    for split, st in split_stats.items():
        splits[split] = {
            "num_samples": sum(st.shard_sizes),
            "shards": st.shards,
            "shard_sizes": st.shard_sizes,
            "class_counts": [st.labels.get(i, 0) for i in range(num_classes)],
        }
    n = np.maximum(tally.stats[2], 1)
    mean = tally.stats[0] / n
    std = np.sqrt(np.maximum(tally.stats[1] / n - mean**2, 0.0))
    widths = np.array([w for w, _ in tally.sizes], dtype=np.float64)
    heights = np.array([h for _, h in tally.sizes], dtype=np.float64)
    return {
        "format_version": FORMAT_VERSION,
        "name": output.name,
        "num_classes": num_classes,
        "classes": source.classes,
        "class_counts": splits["train"]["class_counts"],
        "splits": splits,
        "test_split": source.test_split if source.test_split in splits else None,
        "image_stats": {
            "width": _min_mean_max(widths),
            "height": _min_mean_max(heights),
            "formats": dict(tally.formats),
            "resized": int(tally.resized),
        },
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "stats_images": tally.stats_images,
        "source": source.kind,
        "source_args": source.args,
        "skipped": tally.skipped,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _min_mean_max(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2), "max": int(values.max())}


# ---------------------------------------------------------------------------------------------- summary
def format_summary(meta: dict, output: str | Path, seconds: float) -> str:
    """Human-readable end-of-run summary: per-split counts, class profile, skipped images, mean/std."""
    counts = meta["class_counts"]
    lines = [f"{output}: {meta['num_classes']} classes, written in {seconds:.1f} s"]
    for split, info in meta["splits"].items():
        lines.append(f"  {split}: {info['num_samples']} images in {len(info['shards'])} shards")
    test = meta.get("test_split")
    lines.append("  test split: none (no test set: runs evaluate val only)" if test is None else
                 f"  test split: {test}" + (" (the data set's val is its test set)" if test != "test" else ""))
    ratio = imbalance_ratio(counts)
    lines.append(
        f"  train images per class: max {max(counts)}, min {min(counts)}, ratio {ratio:.1f}"
        + (f" (--imbalance {meta['imbalance']})" if meta.get("imbalance") else "")
    )
    empty = [meta["classes"][i] for i, n in enumerate(counts) if n == 0]
    if empty:
        lines.append(f"  WARNING: {len(empty)} classes have no training image: {empty[:5]}")
    stats = meta["image_stats"]
    lines.append(
        f"  image size: width {stats['width']['min']}..{stats['width']['max']}, "
        f"height {stats['height']['min']}..{stats['height']['max']}; stored {stats['formats']}, "
        f"{stats['resized']} downscaled"
    )
    lines.append(f"  mean {meta['mean']} std {meta['std']}")
    skipped = meta["skipped"]
    if skipped:
        reasons = Counter(s["reason"].split(":")[0] for s in skipped)
        lines.append(f"  skipped {len(skipped)} images ({dict(reasons)}):")
        for s in skipped[:10]:
            lines.append(f"    {s['split']} {s.get('path') or s.get('key')}: {s['reason']}")
        if len(skipped) > 10:
            lines.append(f"    ... and {len(skipped) - 10} more (all listed in meta.json 'skipped')")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards",
        description="Write a raw image data set as WebDataset shards + meta.json, or --verify a shard set.",
    )
    p.add_argument("--source", choices=SOURCE_KINDS, help="raw format")
    p.add_argument("--input", help="data set root (images; CIFAR pickle folder); not needed for demo")
    p.add_argument("--output", help="shard set folder to create, e.g. shards/cifar10_lt100, or a URL to upload "
                   "it to: s3://bucket/sets/NAME, gs://..., 'pipe:aws s3 cp - s3://bucket/sets/NAME/{}'")
    p.add_argument("--train-list", help="list: 'path LABEL' file; inat: train JSON")
    p.add_argument("--val-list", help="list: val list file (e.g. ImageNet_LT_val.txt); inat: val JSON")
    p.add_argument("--test-list", help="list: test list file (e.g. ImageNet_LT_test.txt), written as the test split")
    p.add_argument("--val-per-class", type=int,
                   help="cifar: carve a balanced val of N images per class from train; the official test set "
                        "becomes the test split")
    p.add_argument("--imbalance", type=float, help="subsample train onto an exponential profile, max/min = GAMMA")
    p.add_argument("--max-side", type=int, help="downscale images whose longer side exceeds N pixels")
    p.add_argument("--shard-size", default="1000", help="samples per shard (1000) or bytes (256MB) [1000]")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsampling and of the shard order [0]")
    p.add_argument("--num-classes", type=int, help="list: number of classes (labels must be below it)")
    p.add_argument("--skip-missing", action="store_true", help="write the rest when listed files are missing")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing shard set of the same data")
    p.add_argument("--stats-samples", type=int, default=1000, help="training images measured for mean/std")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verify", metavar="DIR", help="re-read shard set DIR (or URL) and check it against its meta.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/make_shards.py`` and ``livt shard``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.verify:
            return _verify_main(args)
        if not args.source or not args.output:
            raise SourceError("--source and --output are required (or --verify DIR)")
        if args.max_side is not None and args.max_side < 1:
            raise SourceError(f"--max-side {args.max_side}: must be a positive number of pixels")
        start = time.time()
        source = open_source(
            args.source, args.input, train_list=args.train_list, val_list=args.val_list, test_list=args.test_list,
            num_classes=args.num_classes, val_per_class=args.val_per_class, seed=args.seed,
        )  # fmt: skip
        options = dict(
            imbalance=args.imbalance, max_side=args.max_side, shard_size=args.shard_size, workers=args.workers,
            seed=args.seed, overwrite=args.overwrite, skip_missing=args.skip_missing, progress=not args.no_progress,
            command=shlex.join(["scripts/make_shards.py", *argv]), stats_samples=args.stats_samples,
        )  # fmt: skip
        if is_url(args.output):
            meta = write_and_upload(source, args.output, **options)
        else:
            meta = write_shards(source, args.output, **options)
    except Exception as exn:
        if not isinstance(exn, (SourceError, ValueError, RuntimeError, OSError)) and not is_credentials_error(exn):
            raise
        print(f"make_shards: error: {exn}", file=sys.stderr)
        return 2
    print(format_summary(meta, args.output, time.time() - start))
    return 0


def _verify_main(args: argparse.Namespace) -> int:
    ok, lines = verify_shards(args.verify, workers=args.workers, progress=not args.no_progress)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
