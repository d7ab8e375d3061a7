"""Input-pipeline throughput: the WebDataset training stream against torchvision ImageFolder + DataLoader.

All read the same JPEG images and apply the same transform (MGP: RandomResizedCrop + flip; BFT: timm's
RandAugment + random erasing) at ``--img-size`` with ``--workers`` DataLoader workers, in the same run.
The stream is measured twice: from the local shard folder, and over HTTP from a ``python -m http.server``
process on 127.0.0.1 serving that folder (``data.path=http://...``: same bytes, through the remote opener).
Without ``--input`` it first generates an image folder (``--num-images`` JPEGs of about 400x350 with
natural-image-like content) and shards it. Prints one JSON object.

    python scripts/bench_data.py --workers 2 --batches 40
    python scripts/bench_data.py --input /data/imagenet_lt_folder --workers 16 --batches 200
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from livt_ds.config import AugmentConfig
from livt_ds.data.device_crop import CropBatch
from livt_ds.data.make_shards import write_shards
from livt_ds.data.pipeline import StreamPosition, train_loader
from livt_ds.data.shards import read_tar_samples, shard_paths
from livt_ds.data.sources import read_imagefolder
from livt_ds.data.synthetic import write_image_folder
from livt_ds.data.transforms import PretrainCrop, finetune_transform, pretrain_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PAPER = AugmentConfig()  # the BFT transform is measured with the paper's augmentation (the recipe defaults)
CPU_CLOCK = time.process_time  # per core: CPU seconds of this process, so other load on the machine counts less
PAPER_FINETUNE = dict(rand_augment=PAPER.rand_augment, re_prob=PAPER.re_prob, crop_scale=PAPER.crop_scale)


def timed(batches, warmup: int, count: int, clock=time.perf_counter) -> dict:
    """Images/s over ``count`` batches after ``warmup`` ones (worker start-up excluded), and with it; ``clock``:
    wall time, or this process's CPU time (``time.process_time``) for work done in process. The checksum of the
    batches (a 64-bit sum of every pixel costs about as much as making a small image) is not counted."""
    start = clock()
    images, t0, sums, unclocked, unclocked_all = 0, None, [], 0.0, 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            t0, images, unclocked = clock(), 0, 0.0
        images += len(x)
        paused = clock()
        sums.append((pixel_sum(x), y.tolist()))  # the checksum below
        spent = clock() - paused
        unclocked, unclocked_all = unclocked + spent, unclocked_all + spent
        if i + 1 == warmup + count:
            break
    end = clock()
    with_startup = (warmup + count) * len(x) / (end - start - unclocked_all)
    checksum = hashlib.sha256(repr(sums).encode()).hexdigest()[:16]  # the same batches read two ways agree
    return {"img_s": round(images / (end - t0 - unclocked), 1), "img_s_incl_startup": round(with_startup, 1),
            "checksum": checksum}


def pixel_sum(images) -> float:
    """The sum of a batch's pixels in 64 bits (of a :class:`CropBatch`'s canvas: the crops as sent)."""
    pixels = images.canvas if isinstance(images, CropBatch) else images
    return float(pixels.double().sum())


def imagefolder_batches(root: Path, transform, batch_size: int, workers: int):
    """Endless torchvision ImageFolder + DataLoader batches (a new shuffled epoch when one ends)."""
    dataset = ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)  # fmt: skip
    while True:
        yield from loader


@contextlib.contextmanager
def http_server(folder: Path):
    """``python -m http.server`` serving ``folder`` on 127.0.0.1 (its own process); yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("http.server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def decode_only(jpegs: list[bytes], count: int, clock=time.perf_counter) -> float:
    """Images/s of torchvision's ``decode_jpeg`` (to RGB) over ``count`` images cycling through ``jpegs``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    start = clock()
    for i in range(count):
        decode_jpeg(tensors[i % len(tensors)], mode=ImageReadMode.RGB)
    return count / (clock() - start)


def per_core(args: argparse.Namespace) -> dict:
    """A loader worker's MGP work per image on one core (in process) against torchvision's decode alone on the same
    bytes; also with the resize in the worker and with the reference transform."""
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    max_side = args.max_side or 256
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(args.input) if args.input else write_image_folder(
            Path(tmp) / "raw", args.num_images, size=(400, 350), jitter=(40, 40), classes=10, workers=1)
        shards = Path(tmp) / "shards"
        meta = write_shards(read_imagefolder(root), shards, workers=1, progress=False, max_side=max_side,
                            stats_samples=200)  # fmt: skip
        jpegs = [s["jpg"] for url in shard_paths(shards, "train") for s in read_tar_samples(url) if "jpg" in s]
        total = args.warmup + args.batches
        transforms = {"pipeline": PretrainCrop(args.img_size, resize_on_device=True),  # what MGP training runs
                      "resize_in_worker_pipeline": PretrainCrop(args.img_size),
                      "reference_pipeline": pretrain_transform(args.img_size, MEAN, STD)}
        runs: dict[str, list[float]] = {"decode_only": [], **{k: [] for k in transforms}}
        for rep in range(args.repeats):  # alternated, best of each: robust to other load on the machine
            for key, tf in transforms.items():
                position = StreamPosition(seed=rep, epoch=0, rank=0, world=1, workers=0, batches=total)
                stream = train_loader(shards, position, transform=tf, batch_size=args.batch_size, shuffle_buffer=256)
                runs[key].append(timed(stream, args.warmup, args.batches, CPU_CLOCK)["img_s"])
            runs["decode_only"].append(round(decode_only(jpegs, args.batches * args.batch_size, CPU_CLOCK), 1))
        best = {k: max(v) for k, v in runs.items()}
        stats = meta["image_stats"]
        return {
            "what": "images per CPU second of this process on one core (pinned, 1 torch thread, no loader workers) "
                    f"of what a loader worker does per image of the MGP training stream at {args.img_size} px: tar "
                    "read, shuffle, seeding, the crop box and flip draws, decode, the crop padded into the batch "
                    f"canvas (the resize to {args.img_size} px and the flip run on the training device, not here), "
                    "against torchvision decode_jpeg alone on the same bytes; also the same stream resizing and "
                    "flipping each crop in the worker (torch's uint8 antialiased bicubic) and with the float reference "
                    "transform (PIL)",
            "pipeline_img_s": best["pipeline"],
            "decode_only_img_s": best["decode_only"],
            "resize_in_worker_pipeline_img_s": best["resize_in_worker_pipeline"],
            "reference_pipeline_img_s": best["reference_pipeline"],
            "pipeline_over_decode": round(best["pipeline"] / best["decode_only"], 3),
            "resize_in_worker_over_decode": round(best["resize_in_worker_pipeline"] / best["decode_only"], 3),
            "reference_over_decode": round(best["reference_pipeline"] / best["decode_only"], 3),
            "all_img_s": runs,
            "images": len(jpegs),
            "image_size_mean": [stats["width"]["mean"], stats["height"]["mean"]],
            "max_side": max_side,
            "img_size": args.img_size,
            "batch_size": args.batch_size,
            "timed_batches": args.batches,
            "machine": {"core": core, "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__,
                        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="image folder ROOT/train/CLASS/*.jpg (generated when absent)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--repeats", type=int, default=2, help="alternating measurements per pipeline (best is kept)")
    p.add_argument("--max-side", type=int, help="also pass --max-side to make_shards (pre-resized shards)")
    p.add_argument("--no-http", dest="http", action="store_false", help="skip the stream over HTTP (localhost)")
    p.add_argument("--per-core", action="store_true",
                   help="one core, in process: a loader worker's MGP work per image vs decode alone")
    p.add_argument("--json-out", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.per_core:
        report = per_core(args)
        report["command"] = " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
        return emit(report, args.json_out)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(args.input) if args.input else write_image_folder(
            Path(tmp) / "raw", args.num_images, size=(400, 350), jitter=(40, 40), classes=10,
            workers=max(1, args.workers))
        shards = Path(tmp) / "shards"
        t = time.perf_counter()
        meta = write_shards(read_imagefolder(root), shards, workers=max(1, args.workers), progress=False,
                            max_side=args.max_side, stats_samples=200)  # fmt: skip
        shard_s = time.perf_counter() - t
        results = {}
        transforms = {"pretrain": pretrain_transform(args.img_size, MEAN, STD),
                      "finetune": finetune_transform(args.img_size, MEAN, STD, **PAPER_FINETUNE)}
        with contextlib.ExitStack() as stack:
            base_url = stack.enter_context(http_server(Path(tmp))) if args.http else None
            for name, tf in transforms.items():
                total = args.warmup + args.batches
                locations = {"webdataset_stream": shards}
                if base_url:
                    locations["webdataset_stream_http_localhost"] = f"{base_url}/shards"
                runs: dict[str, list[dict]] = {k: [] for k in [*locations, "imagefolder"]}
                for rep in range(args.repeats):  # alternated, best of each: robust to other load on the machine
                    for key, location in locations.items():
                        position = StreamPosition(seed=rep, epoch=0, rank=0, world=1, workers=args.workers,
                                                  batches=total)
                        stream = train_loader(location, position, transform=tf, batch_size=args.batch_size,
                                              shuffle_buffer=256)
                        runs[key].append(timed(stream, args.warmup, args.batches))
                    base = imagefolder_batches(root, tf, args.batch_size, args.workers)
                    runs["imagefolder"].append(timed(base, args.warmup, args.batches))
                best = {k: max(v, key=lambda r: r["img_s"]) for k, v in runs.items()}
                ratio = round(best["webdataset_stream"]["img_s"] / best["imagefolder"]["img_s"], 3)
                extra = {}
                if base_url:
                    http_img_s = best["webdataset_stream_http_localhost"]["img_s"]
                    extra["http_over_local"] = round(http_img_s / best["webdataset_stream"]["img_s"], 3)
                results[name] = {**best, "ratio": ratio, **extra,
                                 "all_img_s": {k: [r["img_s"] for r in v] for k, v in runs.items()}}  # fmt: skip
        stats = meta["image_stats"]
        report = {
            "what": "training input pipeline images/s (decode + augmentation), WebDataset stream (local folder and "
                    "over HTTP from 127.0.0.1) vs ImageFolder",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
            "images": meta["splits"]["train"]["num_samples"],
            "image_size_mean": [stats["width"]["mean"], stats["height"]["mean"]],
            "shard_bytes": sum(f.stat().st_size for f in shards.glob("*.tar")),
            "make_shards_s": round(shard_s, 2),
            "workers": args.workers,
            "batch_size": args.batch_size,
            "img_size": args.img_size,
            "timed_batches": args.batches,
            "results": results,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        }
    return emit(report, args.json_out)


def emit(report: dict, json_out: str | None) -> int:
    text = json.dumps(report, indent=1)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
