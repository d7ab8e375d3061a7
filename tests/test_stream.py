"""One training stream per launch: epochs back to back in one loader, the same batches as one loader per epoch,
workers started once through the fork server."""

from __future__ import annotations

import os

import pytest
import torch
from datafixtures import make_shard_set
from torchvision import transforms as T

from livt_ds.data import pipeline
from livt_ds.data.pipeline import StreamPosition, eval_loader, train_loader

PIXELS = T.PILToTensor()
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shard_set(tmp_path_factory.mktemp("stream") / "s", 13, 5)  # 3 shards, the last one short


def batches(shard_dir, *, epoch=0, skip=0, epochs=None, workers=0, transform=PIXELS, world=2, rank=1, batches=5):
    position = StreamPosition(seed=4, epoch=epoch, rank=rank, world=world, workers=workers, batches=batches,
                              skip=skip)
    loader = train_loader(shard_dir, position, epochs=epochs, transform=transform, batch_size=3, shuffle_buffer=6)
    out = list(loader)
    assert len(out) == len(loader)
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize(("workers", "epoch", "skip"), [(0, 0, 0), (0, 1, 2), (2, 0, 3), (2, 1, 0), (2, 0, 4)])
def test_one_loader_runs_the_epochs_of_per_epoch_loaders(shards, workers, epoch, skip):
    """The stream from (epoch, skip) to the end of training is, batch for batch, the first epoch's loader from skip
    followed by whole-epoch loaders: the order per rank and worker is that of one loader per epoch, so a launch
    resumed anywhere continues the uninterrupted stream. 5 batches per epoch: never a multiple of the workers."""
    per_epoch = batches(shards, epoch=epoch, skip=skip, workers=workers)
    for e in range(epoch + 1, 4):
        per_epoch += batches(shards, epoch=e, workers=workers)
    one = batches(shards, epoch=epoch, skip=skip, epochs=4, workers=workers)
    assert len(one) == (4 - epoch) * 5 - skip
    assert same(one, per_epoch)
    assert not same(one[:5], one[5:10])  # the epochs are not copies of each other


def test_resumed_stream_is_the_tail_of_the_uninterrupted_one(shards):
    full = batches(shards, epochs=3, workers=2)
    for step in (3, 5, 7, 11):
        resumed = batches(shards, epoch=step // 5, skip=step % 5, epochs=3, workers=2)
        assert same(resumed, full[step:]), step


def pids(img) -> torch.Tensor:
    """A 'transform' that reports the worker process and its parent (module level: workers unpickle it)."""
    del img
    return torch.tensor([os.getpid(), os.getppid()])


def test_workers_start_once_from_the_fork_server(shards):
    """Every batch of a 3-epoch stream comes from the same 2 worker processes, and their parent is the fork server,
    not this (threaded) process."""
    seen = batches(shards, epochs=3, workers=2, transform=pids)
    workers = {int(x[0, 0]) for x, _ in seen}
    parents = {int(x[0, 1]) for x, _ in seen}
    assert len(seen) == 15 and len(workers) == 2 and os.getpid() not in workers
    assert len(parents) == 1 and os.getpid() not in parents  # forked by the fork server
    loader = train_loader(shards, StreamPosition(seed=0, epoch=0, rank=0, world=1, workers=1, batches=2),
                          transform=PIXELS, batch_size=2)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    evals = eval_loader(shards, split="train", transform=PIXELS, batch_size=2, num_workers=1, rank=0, world_size=1)
    assert evals.multiprocessing_context.get_start_method() == "forkserver"


def test_a_persistent_eval_loader_keeps_its_workers_and_repeats_every_sample(shards):
    loader = eval_loader(shards, split="train", transform=pids, batch_size=2, num_workers=2, rank=0, world_size=1,
                         return_keys=True, persistent=True)
    passes = []
    for _ in range(2):
        loader.dataset.tally.reset()
        passes.append(list(loader))
        assert sum(loader.dataset.tally.values()) == 13  # the per-shard tally of this pass alone
    keys = [sorted(k for *_, ks in batches for k in ks) for batches in passes]
    assert keys[0] == keys[1] and len(keys[0]) == 13  # every sample once, at each pass
    workers = [{int(x[0, 0]) for x, *_ in batches} for batches in passes]
    assert len(workers[0]) == 2 and workers[0] == workers[1]  # the same two processes both times


def test_without_workers_the_stream_runs_in_process(shards):
    seen = batches(shards, epochs=2, workers=0, transform=pids)
    assert {int(x[0, 0]) for x, _ in seen} == {os.getpid()}


def test_forkserver_preloads_the_package_torchvision_and_timm():
    assert {"livt_ds.data.pipeline", "torchvision", "timm"} <= set(pipeline.WORKER_PRELOAD)
    assert not hasattr(pipeline, "settle_feeder_threads")


def test_an_end_before_the_position_is_refused(shards):
    with pytest.raises(ValueError, match="epochs 1: the stream position is already in epoch 1"):
        batches(shards, epoch=1, epochs=1)
