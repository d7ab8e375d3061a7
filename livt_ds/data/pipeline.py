"""WebDataset streams: a resampled, deterministic, resumable training stream and an exactly-once eval stream.

Training (:func:`train_loader`), per rank ``r`` of ``R`` and DataLoader worker ``w`` of ``W``:

1. *Shard tape*: for epoch ``e`` an endless sequence of shards, one fresh seeded permutation of all shards
   after another (:func:`shard_tape`). Slot ``(r, w)`` takes every ``R``-th entry from position ``r``
   (explicit-rank ``split_by_node``), then every ``W``-th of those from ``w`` (``split_by_worker``). Every
   shard is read about equally often, and since the tape never ends every rank can run the same number of
   batches whatever the shard count (no hang at the epoch end in ZeRO's step).
   (``wds.ResampledShards`` draws shards *with* replacement: with about as many shards as slots it leaves
   ~37 % of the shards unread per epoch, which the tail classes of a long-tailed set feel.)
2. Tar -> raw samples (bytes, not decoded) -> ``wds.shuffle`` with a seeded buffer -> numbered.
3. ``wds.batched`` into chunks of ``batch_size`` raw samples. Loader batch ``j`` is chunk ``j // W`` of
   worker ``j % W`` (DataLoader round-robin), so batch ``j`` is fixed by ``(seed, epoch, rank, j, W)``.
4. Resume: ``skip_batches=k`` drops the first chunks of each worker *before decoding*; the worker with
   loader id ``i`` plays logical worker ``(i + k) % W`` so that the first batch after resuming is batch ``k``.
5. Each sample is decoded and transformed with python/numpy/torch RNGs seeded from
   ``(seed, epoch, rank, worker, sample number)``, so augmentation is reproducible too (with
   ``num_workers=0`` the caller's RNG states are restored afterwards). A corrupt sample (undecodable image,
   missing or bad label) is skipped with a counted warning and its place in the batch is taken by a repeat
   of a good sample of the same chunk, so batches stay full and resume stays exact even across corrupt
   samples. An exception raised by the transform is a bug, not bad data: it propagates.
6. Each worker yields its share of ``num_batches`` (``with_epoch``), the loader exactly
   ``num_batches - skip_batches`` batches. The stream depends on ``num_workers``: resume with the same value.
7. One loader runs every remaining epoch (``end_epoch``): each worker chains its share of one epoch after the
   other (:meth:`TrainStream.loader_worker_batches`), so the workers start once per launch and begin the next
   epoch while the trainer drains the batches already prepared. Each epoch is the stream of steps 1-6 for that
   epoch (its own tape and a fresh shuffle buffer), so where a launch starts changes nothing.

Evaluation (:func:`eval_loader`): the shards are cut into units (shard, part ``p`` of ``P``: the samples
``i`` of that shard with ``i % P == p``), ``P = ceil(R*W / shards)`` so there are at least as many units as
slots; units go to ranks and workers round-robin. Each sample belongs to exactly one unit, so every sample is
seen exactly once across all ranks and workers; ranks may get different batch counts (the last batch of each
worker may be partial).

Counting skipped samples: :func:`skipped_samples` reads a shared-memory counter that DataLoader workers
started from loaders of this process increment too (shared by fork/spawn/forkserver inheritance); a shard
that cannot be opened counts as one. Workers also log a warning per skip (``logging``, this module's logger);
each rank counts its own, so sum across ranks if you report a total. A local shard read that ends before the
number of samples meta.json lists (a file cut short, overwritten with other bytes, not a tar) counts once in
:func:`skipped_shards` and once in :func:`skipped_samples` per read, like a shard given up (below), however
it broke; the samples before the damage are used. A training stream reads each shard many times per epoch,
so these counts are reads, not distinct files.

Shard sets behind URLs (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``; see :mod:`livt_ds.data.remote`): a
read that fails is retried (``remote``: :class:`RemoteOptions`) and continues at the byte where it stopped, so
the stream is exactly that of a local read. A shard given up after the retries (or missing) is counted by
:func:`skipped_shards` (and as one skipped sample, as above) and the stream moves on to the next shard of its
tape: the rank still yields its ``num_batches`` (its samples then differ from a local run's).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import math
import multiprocessing
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from livt_ds.data.device_crop import stack_images
from livt_ds.data.remote import DEFAULT_OPTIONS, RemoteOptions
from livt_ds.data.shards import (
    decode_image,
    decode_label,
    image_key,
    load_meta,
    read_tar_samples,
    shard_files,
    shard_paths,
)
from livt_ds.errors import DataSourceOutage, ReadGaveUp, ShardCutShort, ShardUnavailable

logger = logging.getLogger(__name__)

_TAPE, _SHUFFLE, _SAMPLE = 1, 2, 3  # stream tags mixed into the seeds
OUTAGE_SHARDS = 3  # training: reads of this many different shards in a row given up after their retries = an outage
SHUFFLE_BUFFER = 1000  # raw (undecoded) training samples held per loader worker for shuffling
PREFETCH_BATCHES = 2  # batches each loader worker keeps ready ahead of the trainer
WORKER_PRELOAD = ("livt_ds.data.pipeline", "livt_ds.data.transforms", "torchvision", "timm")  # imported once, by the
#   fork server, before it forks any loader worker
_exit_hook = False  # _kill_workers_at_exit registered
_counter = None  # multiprocessing.Value("q"): samples skipped in this process and its loader workers
_shard_counter = None  # multiprocessing.Value("q"): shard reads given up or cut short (see skipped_shards)


# ---------------------------------------------------------------------------------------------- counting
def worker_context() -> multiprocessing.context.BaseContext:
    """The ``forkserver`` context every loader of the package starts its workers with.

    A worker forked from the trainer inherits a process with live threads (TensorBoard writer, progress bar, run-lock
    heartbeat, other loaders' queue feeders, gloo) and can block forever in CPython's after-fork clean-up. The fork
    server is a fresh single-threaded process started once (by fork + exec); it imports the package, torchvision and
    timm first, so each worker forked from it starts with them loaded.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))  # read when the server starts (first worker of a process)
    return context


def _skip_counter():
    global _counter
    if _counter is None:
        _counter = worker_context().Value("q", 0)
    return _counter


def _shard_skip_counter():
    global _shard_counter
    if _shard_counter is None:
        _shard_counter = worker_context().Value("q", 0)
    return _shard_counter


def skipped_shards() -> int:
    """Shard reads given up so far by this process's loaders: missing, failing after the retries, or ending before
    the samples meta.json lists (truncated or damaged)."""
    return 0 if _shard_counter is None else int(_shard_counter.value)


def skipped_samples() -> int:
    """Corrupt samples skipped so far by the loaders built in this process (their workers included)."""
    return 0 if _counter is None else int(_counter.value)


def reset_skipped_samples() -> None:
    """Set the skipped-sample and skipped-shard counters back to 0 (e.g. at the start of an epoch)."""
    for counter in (_counter, _shard_counter):
        if counter is not None:
            with counter.get_lock():
                counter.value = 0


class CountedSkip:
    """A webdataset ``handler``: count the failure, log a warning, continue (``warn_and_continue``, counted).

    A :class:`ShardUnavailable` (a shard missing or given up after its retries) also counts in ``shards``.
    """

    def __init__(self, counter, where: str, shards=None):
        self.counter, self.where, self.shards = counter, where, shards

    def __call__(self, exn: BaseException) -> bool:
        # the sample first: a reader that takes the shard count before the sample count (skipped_this_launch)
        # never sees more skipped shards than samples
        with self.counter.get_lock():
            self.counter.value += 1
            total = self.counter.value
        if isinstance(exn, ShardUnavailable) and self.shards is not None:
            with self.shards.get_lock():
                self.shards.value += 1
            logger.warning("%s: skipped the rest of a shard (%d shards skipped so far): %s", self.where,
                           self.shards.value, exn)  # fmt: skip
        logger.warning("%s: skipped a corrupt sample (%d skipped so far): %s", self.where, total, exn)
        return True


# ---------------------------------------------------------------------------------------------- stages
def _mix(*values: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence: well mixed, stable across processes and runs)."""
    state = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def shard_tape(urls: list[str], seed: int, epoch: int) -> Iterator[str]:
    """Endless shard order of one epoch: a fresh seeded permutation of all ``urls`` per round."""
    for round_ in count():
        order = list(urls)
        random.Random(_mix(_TAPE, seed, epoch, round_)).shuffle(order)
        yield from order


def _take_every(src: Iterable, start: int, step: int) -> Iterator:
    """Items ``start, start + step, ...``: ``split_by_node``/``split_by_worker`` with explicit indices."""
    return islice(src, start, None, step)


take_every = wds.pipelinefilter(_take_every)




class _ShardRead:
    """The handler of one shard read: tar-level errors are held back and reported once, with the read's outcome
    (:func:`_read_units`); a shard given up by the reader (missing, unreadable) goes through at once."""

    def __init__(self, handler: Callable):
        self.handler, self.errors, self.gave_up = handler, [], False
        self.retried_out: ReadGaveUp | None = None  # the read failed after all its retries (an outage, if repeated)

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, ShardUnavailable):
            self.gave_up = True
            self.retried_out = exn if isinstance(exn, ReadGaveUp) else None
            return self.handler(exn)
        self.errors.append(exn)
        return True

    def close(self, url: str, read: int, expected: int | None) -> None:
        """Report the read: one :class:`ShardCutShort` if it ended early, else its held-back errors (if any)."""
        if self.gave_up:
            return
        if expected is not None and read < expected:
            cause = f" ({self.errors[0]!r})" if self.errors else ""
            self.handler(ShardCutShort(f"{url}: the read ended after {read} of the {expected} samples that meta.json "
                                       f"lists{cause}: the file is truncated or damaged; rebuild the shard set "
                                       "(scripts/make_shards.py --verify finds such files)"))
            return
        for exn in self.errors:
            self.handler(exn)


class ShardTally:
    """Samples read per shard by the loaders of one stream, its DataLoader workers included (shared memory, like
    the skip counters): how an evaluation tells which shard came up short."""

    def __init__(self, urls: list[str]):
        self.index = {url: i for i, url in enumerate(urls)}
        self.counts = worker_context().Array("q", max(1, len(urls)))  # the context the loader workers start in

    def add(self, url: str, n: int) -> None:
        with self.counts.get_lock():
            self.counts[self.index[url]] += n

    def values(self) -> list[int]:
        return list(self.counts[: len(self.index)])

    def reset(self) -> None:
        """Back to 0: before another pass of a loader whose workers stay (``eval_loader(persistent=True)``)."""
        with self.counts.get_lock():
            self.counts[:] = [0] * len(self.counts)


def _read_units(
    src: Iterable, handler: Callable, max_empty: int | None = None, remote: RemoteOptions = DEFAULT_OPTIONS,
    sizes: dict[str, int] | None = None, tally: ShardTally | None = None, outage_after: int | None = None,
) -> Iterator[dict]:  # fmt: skip
    """Raw samples of each unit: a shard url (str), or ``{"url", "part", "parts"}`` = every ``parts``-th sample.

    ``sizes``: samples per shard url (meta.json's ``shard_sizes``); a read that ends before them is reported to
    ``handler`` once, as a :class:`ShardCutShort` (a skipped shard), whatever broke it.
    ``max_empty``: raise after that many units in a row gave no sample (an endless tape of broken shards
    would otherwise spin forever).
    ``outage_after``: raise :class:`DataSourceOutage` once reads of that many different shards in a row gave up
    after their retries (one broken file is skipped; the source failing for every file is an outage).
    """
    empty = 0
    retried_out: dict[str, ReadGaveUp] = {}  # shards whose reads gave up since the last good read
    for unit in src:
        url, part, parts = (unit, 0, 1) if isinstance(unit, str) else (unit["url"], unit["part"], unit["parts"])
        n = read = 0
        report = _ShardRead(handler)
        for i, sample in enumerate(read_tar_samples(url, handler=report, remote=remote)):
            read = i + 1
            if i % parts == part:
                n += 1
                yield sample
        report.close(url, read, (sizes or {}).get(url))
        if tally is not None:
            tally.add(url, n)
        if report.retried_out is not None:
            retried_out[url] = report.retried_out
            if outage_after and len(retried_out) >= outage_after:
                raise DataSourceOutage(f"the data source is unavailable: reads of {len(retried_out)} shards in a row "
                                       f"failed after their retries; the last: {report.retried_out}")
        elif read:
            retried_out.clear()
        empty = 0 if n else empty + 1
        if max_empty is not None and empty >= max_empty:
            raise RuntimeError(f"{empty} shards in a row gave no sample (last {url}); check the set with --verify")


read_units = wds.pipelinefilter(_read_units)


def _number(src: Iterable[dict]) -> Iterator[dict]:
    """Attach ``__index__``: the sample's position in this worker's shuffled stream (seeds its augmentation)."""
    for i, sample in enumerate(src):
        sample["__index__"] = i
        yield sample


number = wds.pipelinefilter(_number)


def _drop(src: Iterable, n: int) -> Iterator:
    return islice(src, n, None)


drop = wds.pipelinefilter(_drop)


def seed_rngs(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch's CPU generator (not CUDA's) from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def preserved_rngs(active: bool = True) -> Iterator[None]:
    """Restore python ``random``, numpy's global RNG and torch's CPU generator on exit (``active=False``: nothing,
    where nobody else uses them, as in DataLoader workers; the save/restore costs ~0.1 ms)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if active else None
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


@contextlib.contextmanager
def seeded_rngs(seed: int, restore: bool = True) -> Iterator[None]:
    """:func:`seed_rngs` inside :func:`preserved_rngs`: the caller's RNG states come back afterwards."""
    with preserved_rngs(restore):
        seed_rngs(seed)
        yield


def _load(sample: dict, num_classes: int) -> tuple:
    label = decode_label(sample, num_classes)
    return decode_image(sample[image_key(sample)]), label


class _TrainBatch:
    """Chunk of raw samples -> ``(images [B,3,H,W], labels [B] int64)``, corrupt ones replaced.

    Each sample's random draws happen inside its seeded RNGs. A transform with ``draw`` and ``load`` (PretrainCrop)
    draws from the bytes (``draw``, seeded, per sample), then the batch's images are decoded back to back (``load``:
    no random draws) and transformed; any other transform gets the image decoded by :func:`decode_image` to a PIL
    image and runs inside the sample's seeded RNGs. A ``draw``/``load``/decode error is a corrupt sample (counted,
    skipped); a transform error is a bug and propagates. The transformed images are batched by
    ``transform.collate`` when it has one (crops resized on the device), else by :func:`stack_images`."""

    def __init__(self, transform: Callable, num_classes: int, seed_key: tuple[int, ...], handler: CountedSkip):
        self.transform, self.num_classes, self.seed_key, self.handler = transform, num_classes, seed_key, handler
        self.draw, self.load = getattr(transform, "draw", None), getattr(transform, "load", None)
        self.collate = getattr(transform, "collate", stack_images)

    def __call__(self, chunk: list[dict]) -> tuple[Tensor, Tensor]:
        in_process = get_worker_info() is None  # the trainer's own RNG states must survive the transforms
        with preserved_rngs(in_process):  # saved and restored once per batch, not per sample
            return self._batch(chunk)

    def _batch(self, chunk: list[dict]) -> tuple[Tensor, Tensor]:
        images, labels, errors, drawn = [], [], [], []
        two_step = self.draw is not None and self.load is not None
        for sample in chunk:
            seed_rngs(_mix(_SAMPLE, *self.seed_key, sample["__index__"]))
            try:
                label = decode_label(sample, self.num_classes)
                data = sample[image_key(sample)]
                item = self.draw(data) if two_step else decode_image(data)
            except Exception as exn:  # a corrupt sample is skipped (counted), never a crash
                self._skip(sample, exn, errors)
                continue
            if two_step:
                drawn.append((sample, item, label))
            else:
                images.append(self.transform(item))  # transform errors are bugs, not bad data: they propagate
                labels.append(label)
        decoded = []
        for sample, item, label in drawn:  # back to back: the decoder's code and tables stay in the CPU's caches
            try:
                decoded.append((self.load(item), label))
            except Exception as exn:
                self._skip(sample, exn, errors)
        for item, label in decoded:
            images.append(self.transform(item))
            labels.append(label)
        if not images:
            raise RuntimeError(
                f"all {len(chunk)} samples of a batch are corrupt (first: {errors[0]!r}); "
                "check the shard set with scripts/make_shards.py --verify"
            )
        good = len(images)
        for i in range(len(chunk) - good):  # repeats keep the batch full and the raw-sample accounting exact
            images.append(images[i % good])
            labels.append(labels[i % good])
        return self.collate(images), torch.tensor(labels, dtype=torch.int64)

    def _skip(self, sample: dict, exn: Exception, errors: list[Exception]) -> None:
        errors.append(exn)
        self.handler(ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')}: {exn!r}"))


def _decode_eval(sample: dict, num_classes: int) -> tuple:
    """Raw sample -> ``(PIL image, label, key)``; raises on corrupt data (the stage's handler counts it)."""
    img, label = _load(sample, num_classes)
    return img, label, sample["__key__"]


class _EvalTransform:
    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, item: tuple) -> tuple[Tensor, int, str]:
        img, label, key = item
        return self.transform(img), label, key


def _collate_eval(samples: list[tuple[Tensor, int, str]]) -> tuple[Tensor, Tensor, list[str]]:
    images, labels, keys = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(keys)


def _worker_slot() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the current DataLoader worker; ``(0, 1)`` in-process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ---------------------------------------------------------------------------------------------- streams
class TrainStream(IterableDataset):
    """The training stream of one rank from ``epoch`` (after ``skip_batches``) to the end of epoch
    ``end_epoch - 1`` (default: ``epoch`` alone); yields whole batches (see the module docstring)."""

    def __init__(
        self,
        urls: list[str],
        *,
        num_classes: int,
        transform: Callable,
        batch_size: int,
        seed: int,
        shard_sizes: list[int] | None = None,
        epoch: int,
        rank: int,
        world_size: int,
        num_batches: int,
        skip_batches: int = 0,
        end_epoch: int | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        counter=None,
        remote: RemoteOptions = DEFAULT_OPTIONS,
        shard_counter=None,
    ):
        super().__init__()
        self.urls, self.num_classes, self.transform = list(urls), num_classes, transform
        self.sizes = dict(zip(self.urls, shard_sizes)) if shard_sizes is not None else None
        self.remote = remote
        self.shard_counter = shard_counter if shard_counter is not None else _shard_skip_counter()
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.end_epoch = epoch + 1 if end_epoch is None else end_epoch
        if self.end_epoch <= epoch:
            raise ValueError(f"end epoch {self.end_epoch}: must be after the start epoch {epoch}")
        self.rank, self.world_size = rank, world_size
        self.num_batches, self.skip_batches, self.shuffle_buffer = num_batches, skip_batches, shuffle_buffer
        self.counter = counter if counter is not None else _skip_counter()

    def __len__(self) -> int:
        return (self.end_epoch - self.epoch) * self.num_batches - self.skip_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.loader_worker_batches(*_worker_slot())

    def loader_worker_batches(self, worker: int, num_workers: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches loader worker ``worker`` yields, epoch after epoch, in one iterator (workers start once).

        Loader batch ``t`` comes from loader worker ``t % W`` (DataLoader round-robin) and must be global batch
        ``first + t`` of the run (``first``: the position's); in epoch ``e`` that is batch ``first + t - e * N`` of
        the epoch, made by logical worker ``(worker + first - e * N) % W``. Each epoch's stream is the one a loader
        of that epoch alone would give: the order does not depend on where a launch started.
        """
        first = self.epoch * self.num_batches + self.skip_batches
        for epoch in range(self.epoch, self.end_epoch):
            logical = (worker + first - epoch * self.num_batches) % num_workers
            skip = self.skip_batches if epoch == self.epoch else 0
            yield from self.worker_batches(logical, num_workers, epoch=epoch, skip_batches=skip)

    def worker_batches(self, worker: int, num_workers: int, *, epoch: int | None = None,
                       skip_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of logical worker ``worker`` in ``epoch`` (default: the first): the epoch's global batches
        ``worker, worker + W, ...`` from ``skip_batches`` on (default: the position's)."""
        epoch = self.epoch if epoch is None else epoch
        skip_batches = self.skip_batches if skip_batches is None else skip_batches
        skip = len(range(worker, skip_batches, num_workers))
        total = len(range(worker, self.num_batches, num_workers))
        if total <= skip:
            return iter(())
        handler = CountedSkip(self.counter, f"train rank {self.rank} worker {worker}", self.shard_counter)
        shuffle_rng = random.Random(_mix(_SHUFFLE, self.seed, epoch, self.rank, worker))
        pipeline = wds.DataPipeline(
            functools.partial(shard_tape, self.urls, self.seed, epoch),
            take_every(self.rank, self.world_size),
            take_every(worker, num_workers),
            read_units(handler=handler, max_empty=2 * len(self.urls) + 2, remote=self.remote, sizes=self.sizes,
                       outage_after=min(OUTAGE_SHARDS, len(self.urls))),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng),
            number(),
            wds.batched(self.batch_size, collation_fn=None, partial=False),
            drop(skip),  # cheap: raw bytes, nothing decoded yet
            wds.map(_TrainBatch(self.transform, self.num_classes, (self.seed, epoch, self.rank, worker), handler)),
        )
        return iter(pipeline.with_epoch(nbatches=total - skip))


def eval_units(urls: list[str], slots: int) -> list[dict]:
    """Split shards into ``{"url", "part", "parts"}`` units, at least ``slots`` of them, every sample in one."""
    parts = max(1, math.ceil(slots / max(1, len(urls))))
    return [{"url": u, "part": p, "parts": parts} for u in urls for p in range(parts)]


class EvalStream(IterableDataset):
    """The evaluation stream of one rank: its units, every sample once, batches of ``(images, labels[, keys])``."""

    def __init__(
        self,
        urls: list[str],
        shard_sizes: list[int],
        *,
        num_classes: int,
        transform: Callable,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        return_keys: bool = False,
        counter=None,
        remote: RemoteOptions = DEFAULT_OPTIONS,
        shard_counter=None,
    ):
        super().__init__()
        self.urls, self.shard_sizes = list(urls), list(shard_sizes)
        self.remote = remote
        self.shard_counter = shard_counter if shard_counter is not None else _shard_skip_counter()
        self.num_classes, self.transform = num_classes, transform
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.return_keys = max(1, num_workers), return_keys
        self.counter = counter if counter is not None else _skip_counter()
        self.tally = ShardTally(self.urls)  # samples read per shard, across this rank's workers

    def _worker_units(self, worker: int, num_workers: int) -> list[dict]:
        units = eval_units(self.urls, self.world_size * num_workers)
        return units[self.rank :: self.world_size][worker::num_workers]

    def __len__(self) -> int:
        """Batches this rank yields: exact unless corrupt samples are dropped (then an upper bound)."""
        sizes = dict(zip(self.urls, self.shard_sizes))
        total = 0
        for w in range(self.num_workers):
            n = sum(len(range(u["part"], sizes[u["url"]], u["parts"])) for u in self._worker_units(w, self.num_workers))
            total += math.ceil(n / self.batch_size)
        return total

    def __iter__(self) -> Iterator[tuple]:
        return self.worker_batches(*_worker_slot())

    def worker_batches(self, worker: int, num_workers: int) -> Iterator[tuple]:
        """Batches of DataLoader worker ``worker`` of ``num_workers`` on this rank (the last may be partial)."""
        handler = CountedSkip(self.counter, f"eval rank {self.rank} worker {worker}", self.shard_counter)
        pipeline = wds.DataPipeline(
            functools.partial(iter, self._worker_units(worker, num_workers)),
            read_units(handler=handler, remote=self.remote, sizes=dict(zip(self.urls, self.shard_sizes)),
                       tally=self.tally),
            wds.map(functools.partial(_decode_eval, num_classes=self.num_classes), handler=handler),
            wds.map(_EvalTransform(self.transform)),  # transform errors are bugs: they propagate
            wds.batched(self.batch_size, collation_fn=_collate_eval, partial=True),
        )
        for images, labels, keys in pipeline:
            yield (images, labels, keys) if self.return_keys else (images, labels)


# ---------------------------------------------------------------------------------------------- loaders
def _check_rank(rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    if num_workers < 0:
        raise ValueError(f"num_workers {num_workers}: must be >= 0")


def _ignore_sigterm(_worker_id: int) -> None:
    """Workers leave preemption (SIGTERM) to the trainer, which saves a checkpoint; they end with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """Kill this process's daemonic children (loader workers) at interpreter exit.

    Workers ignore SIGTERM, and when the process ends on an uncaught error its traceback keeps the loader (and
    its workers) alive; multiprocessing's own exit handler only sends SIGTERM and then waits for them, forever.
    Registered after that handler, this one runs before it (atexit is last in, first out).
    """
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill as a worker crash
    for child in children:
        child.kill()


def _loader(dataset: IterableDataset, num_workers: int, pin_memory: bool, persistent: bool = False) -> DataLoader:
    global _exit_hook
    if num_workers > 0 and not _exit_hook:
        atexit.register(_kill_workers_at_exit)
        _exit_hook = True
    # A private generator: the loader's base-seed draw must not advance the trainer's global torch RNG
    # (a resumed run would otherwise diverge). The stream seeds itself; the base seed is unused.
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0,
        prefetch_factor=PREFETCH_BATCHES if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_ignore_sigterm,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's training stream starts: ``rank`` of ``world`` with ``workers`` DataLoader workers, in ``epoch``
    of the stream seeded ``seed``, after the first ``skip`` of the epoch's ``batches`` batches (`train_loader` runs on
    from there). The batches are a pure function of these numbers (module docstring), which makes resume exact."""

    seed: int
    epoch: int
    rank: int
    world: int
    workers: int
    batches: int
    skip: int = 0

    def __post_init__(self) -> None:
        if self.batches < 1 or not 0 <= self.skip <= self.batches:
            raise ValueError(f"num_batches {self.batches}, skip_batches {self.skip}: need 0 <= skip <= num_batches "
                             ">= 1")

    def without_rank(self) -> dict[str, int]:
        """The fields every rank shares (what a checkpoint records)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "rank"}


def train_loader(
    shard_dir: str | Path,
    position: StreamPosition,
    *,
    epochs: int | None = None,
    split: str = "train",
    transform: Callable,
    batch_size: int,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    pin_memory: bool = False,
    remote: RemoteOptions = DEFAULT_OPTIONS,
) -> DataLoader:
    """Training batches ``(images [B,3,H,W], labels [B] int64)`` from ``position`` to the end of epoch
    ``epochs - 1`` (the run's last; default: to the end of ``position.epoch``), in one loader: its workers start
    once and run the epochs back to back. The images are what ``transform`` returns (float32, or uint8 for the
    transforms that leave conversion and normalisation to the device), or what its ``collate`` makes of them (a
    ``CropBatch``: crops that the device resizes).

    Yields exactly ``(epochs - position.epoch) * position.batches - position.skip`` full batches: what the
    uninterrupted stream yields after the position's first ``skip`` batches. ``shuffle_buffer``: raw (undecoded)
    samples held per worker for shuffling. ``shard_dir`` may be a URL; ``remote`` says how it is read (retries,
    timeout, cache).
    """
    p = position
    _check_rank(p.rank, p.world, batch_size, p.workers)
    end = p.epoch + 1 if epochs is None else epochs
    if end <= p.epoch:
        raise ValueError(f"epochs {epochs}: the stream position is already in epoch {p.epoch}; nothing is left")
    meta = load_meta(shard_dir, remote)
    remote = remote.expecting(shard_files(shard_dir, meta))  # the cache checks its copies against meta.json
    stream = TrainStream(
        shard_paths(shard_dir, split, remote), num_classes=meta["num_classes"], transform=transform,
        batch_size=batch_size, seed=p.seed, shard_sizes=meta["splits"][split].get("shard_sizes"), epoch=p.epoch,
        rank=p.rank, world_size=p.world, num_batches=p.batches, skip_batches=p.skip, end_epoch=end,
        shuffle_buffer=max(1, shuffle_buffer), remote=remote,
    )  # fmt: skip
    return _loader(stream, p.workers, pin_memory)


def eval_loader(
    shard_dir: str | Path,
    *,
    split: str = "val",
    transform: Callable,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    return_keys: bool = False,
    pin_memory: bool = False,
    remote: RemoteOptions = DEFAULT_OPTIONS,
    persistent: bool = False,
) -> DataLoader:
    """Evaluation batches ``(images [B,3,H,W], labels [B] int64)`` (``+ keys`` with ``return_keys``).

    Across all ranks and workers every sample of ``split`` comes exactly once, at each iteration of the loader;
    ``len()`` is this rank's batch count (ranks differ: pad with dummy steps before collective calls).
    ``persistent``: the workers stay between iterations (a trainer evaluating again and again).
    """
    _check_rank(rank, world_size, batch_size, num_workers)
    meta = load_meta(shard_dir, remote)
    remote = remote.expecting(shard_files(shard_dir, meta))
    stream = EvalStream(
        shard_paths(shard_dir, split, remote), meta["splits"][split]["shard_sizes"], num_classes=meta["num_classes"],
        transform=transform, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
        return_keys=return_keys, remote=remote,
    )  # fmt: skip
    return _loader(stream, num_workers, pin_memory, persistent)
