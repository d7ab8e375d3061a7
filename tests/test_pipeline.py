"""WebDataset streams: exactly-once eval, equal-length deterministic training, exact resume, corrupt samples."""

from __future__ import annotations

import pytest
import torch
from datafixtures import loader_position, make_shard_set, rewrite_tar
from torchvision import transforms as T

from livt_ds.config import AugmentConfig
from livt_ds.data.pipeline import (
    EvalStream,
    StreamPosition,
    TrainStream,
    eval_loader,
    shard_tape,
    skipped_samples,
    train_loader,
)
from livt_ds.data.shards import decode_image, load_meta, read_tar_samples, shard_paths
from livt_ds.data.transforms import finetune_transform, pretrain_transform
from livt_ds.train_state import steps_per_epoch

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
MGP = pretrain_transform(16, MEAN, STD)
PAPER = AugmentConfig()
BFT = dict(rand_augment=PAPER.rand_augment, re_prob=PAPER.re_prob, crop_scale=PAPER.crop_scale)  # the paper's
PIXELS = T.PILToTensor()  # uint8 [3,16,16]: identifies a sample by its image


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Shard sets of 16-px images: ``{1, 3, 5}`` shards of up to 5 samples (last shard short), and 4 x 4."""
    root = tmp_path_factory.mktemp("pipe")
    made = {n: make_shard_set(root / f"s{n}", 5 * n - 2 if n > 1 else 4, 5) for n in (1, 3, 5)}
    made["4x4"] = make_shard_set(root / "s4x4", 16, 4)
    return made


def all_keys(shard_dir, split="train") -> list[str]:
    return [s["__key__"] for url in shard_paths(shard_dir, split) for s in read_tar_samples(url)]


def all_labels(shard_dir, split="train") -> dict[str, int]:
    return {s["__key__"]: int(s["cls"]) for url in shard_paths(shard_dir, split) for s in read_tar_samples(url)}


def train_batches(shard_dir, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    args = dict(transform=MGP, batch_size=4, num_workers=0, seed=1, epoch=0, rank=0, world_size=2, num_batches=5,
                shuffle_buffer=8) | kw  # fmt: skip
    return list(train_loader(shard_dir, loader_position(args), **args))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("n_shards", [1, 3, 5])
def test_eval_two_ranks_two_workers_see_every_key_once(sets, n_shards):
    shard_dir = sets[n_shards]
    seen, labels = [], {}
    for rank in range(2):
        loader = eval_loader(shard_dir, split="train", transform=MGP, batch_size=3, num_workers=2, rank=rank,
                             world_size=2, return_keys=True)  # fmt: skip
        batches = list(loader)
        assert len(batches) == len(loader)  # len() is the rank's batch count
        for images, y, keys in batches:
            assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32 and y.dtype == torch.int64
            seen += keys
            labels.update(zip(keys, y.tolist()))
    assert sorted(seen) == sorted(all_keys(shard_dir))  # every key, exactly once
    assert labels == all_labels(shard_dir)


@pytest.mark.parametrize(("world", "workers"), [(3, 1), (4, 3), (2, 5)])
@pytest.mark.parametrize("n_shards", [1, 3, 5])
def test_eval_partition_for_other_layouts(sets, n_shards, world, workers):
    shard_dir = sets[n_shards]
    meta = load_meta(shard_dir)
    seen = []
    for rank in range(world):
        stream = EvalStream(shard_paths(shard_dir, "train"), meta["splits"]["train"]["shard_sizes"], num_classes=4,
                            transform=PIXELS, batch_size=2, rank=rank, world_size=world, num_workers=workers,
                            return_keys=True)  # fmt: skip
        batches = [b for w in range(workers) for b in stream.worker_batches(w, workers)]
        assert len(batches) == len(stream)
        seen += [k for _, _, keys in batches for k in keys]
    assert sorted(seen) == sorted(all_keys(shard_dir))


# ---------------------------------------------------------------------------------------------- training
def test_train_ranks_get_equal_batch_counts_and_are_deterministic(sets):
    shard_dir = sets[3]
    runs = {rank: train_batches(shard_dir, rank=rank) for rank in range(2)}
    for batches in runs.values():
        assert len(batches) == 5
        assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (4,) for x, y in batches)
    assert not same(runs[0], runs[1])
    assert same(runs[0], train_batches(shard_dir, rank=0))  # same seed: same batches, augmentation included
    assert not same(runs[0], train_batches(shard_dir, rank=0, seed=2))
    assert not same(runs[0], train_batches(shard_dir, rank=0, epoch=1))


def test_one_shard_still_gives_every_rank_its_batches(sets):
    for rank in range(3):
        assert len(train_batches(sets[1], rank=rank, world_size=3, num_batches=4, num_workers=2)) == 4


@pytest.mark.parametrize(("workers", "skip"), [(0, 3), (2, 3), (2, 4)])
def test_skip_batches_resumes_exactly(sets, workers, skip):
    shard_dir = sets[3]
    tf = finetune_transform(16, MEAN, STD, **BFT) if workers else MGP  # RandAugment + erasing must be reproducible too
    full = train_batches(shard_dir, num_batches=7, num_workers=workers, transform=tf)
    resumed = train_batches(shard_dir, num_batches=7, num_workers=workers, transform=tf, skip_batches=skip)
    assert len(full) == 7 and len(resumed) == 7 - skip
    assert same(full[skip:], resumed)


def test_loader_batches_follow_the_worker_round_robin(sets):
    shard_dir = sets[5]
    loader_batches = train_batches(shard_dir, num_batches=5, num_workers=2)
    stream = TrainStream(shard_paths(shard_dir, "train"), num_classes=4, transform=MGP, batch_size=4, seed=1,
                         epoch=0, rank=0, world_size=2, num_batches=5, shuffle_buffer=8)  # fmt: skip
    per_worker = [list(stream.worker_batches(w, 2)) for w in range(2)]
    assert same(loader_batches, [per_worker[j % 2][j // 2] for j in range(5)])


def test_one_round_of_the_tape_splits_shards_across_ranks(sets):
    shard_dir = sets["4x4"]
    urls = shard_paths(shard_dir, "train")
    tape = shard_tape(urls, seed=0, epoch=0)
    rounds = [[next(tape) for _ in urls] for _ in range(2)]
    assert sorted(rounds[0]) == sorted(urls) == sorted(rounds[1]) and rounds[0] != rounds[1]
    everything = {PIXELS(decode_image(s["png"])).numpy().tobytes() for u in urls for s in read_tar_samples(u)}
    seen = []
    for rank in range(2):  # 2 ranks x 2 batches x 4 = 16 samples = one round, read without a shuffle buffer
        batches = train_batches(shard_dir, rank=rank, num_batches=2, transform=PIXELS, shuffle_buffer=1)
        seen += [x.numpy().tobytes() for images, _ in batches for x in images]
    assert len(seen) == 16 and set(seen) == everything


@pytest.mark.parametrize("workers", [0, 2])
def test_default_nodesplitter_is_not_used(sets, monkeypatch, workers):
    args = dict(rank=1, world_size=2, num_batches=3, num_workers=workers, transform=PIXELS)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    clean = train_batches(sets[5], **args)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with_env = train_batches(sets[5], **args)
    assert len(with_env) == 3
    assert same(with_env, clean)  # explicit rank: the launcher's variables change nothing
    assert not same(with_env, train_batches(sets[5], **{**args, "rank": 3, "world_size": 4}))  # they could have


def test_skipped_batches_are_dropped_before_decoding(sets, monkeypatch):
    """Resuming at batch k decodes only the batches it yields: every PIL decode in this process is counted."""
    import PIL.Image

    opened, transformed = [], []
    real_open = PIL.Image.open

    def counting_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    def counting_transform(img):
        transformed.append(1)
        return PIXELS(img)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    full = train_batches(sets[3], num_batches=7, num_workers=0, transform=counting_transform)
    assert len(opened) == len(transformed) == 7 * 4
    opened.clear(), transformed.clear()
    resumed = train_batches(sets[3], num_batches=7, num_workers=0, transform=counting_transform, skip_batches=5)
    assert same(full[5:], resumed)
    assert len(opened) == len(transformed) == 2 * 4  # not 7 x 4: the 5 skipped batches were never decoded


def test_bad_arguments_say_what_is_wrong(sets):
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        train_batches(sets[3], rank=2)
    with pytest.raises(ValueError, match="skip_batches 6"):
        train_batches(sets[3], skip_batches=6)
    assert steps_per_epoch(load_meta(sets[5])["splits"]["train"]["num_samples"], global_batch=4 * 2) == 2


# ---------------------------------------------------------------------------------------------- corrupt data
def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    shard_dir = make_shard_set(tmp_path / "bad", 12, 6)
    rewrite_tar(shard_dir / "train-000001.tar", lambda name, data: data[:30] if name == "train_00000007.png" else data)

    before = skipped_samples()
    seen = []
    for rank in range(2):
        loader = eval_loader(shard_dir, split="train", transform=MGP, batch_size=4, num_workers=2, rank=rank,
                             world_size=2, return_keys=True)  # fmt: skip
        seen += [k for *_, keys in loader for k in keys]
    assert sorted(seen) == sorted(set(all_keys(shard_dir)) - {"train_00000007"})
    assert skipped_samples() - before == 1  # counted in the DataLoader workers, visible here

    before = skipped_samples()
    full = train_batches(shard_dir, num_batches=6, world_size=1, num_workers=0)  # 24 draws of 12 samples
    assert len(full) == 6 and all(x.shape[0] == 4 for x, _ in full)  # the hole is filled, batches stay full
    assert skipped_samples() > before
    assert same(full[4:], train_batches(shard_dir, num_batches=6, world_size=1, num_workers=0, skip_batches=4))


def test_corrupt_sample_is_replaced_by_a_good_sample_of_its_batch(tmp_path):
    """The hole left by a corrupt sample is filled with a repeat of a good sample of the same batch: identical
    pixels and the matching label (not a zero image, not another batch's sample, not a wrong label)."""
    shard_dir = make_shard_set(tmp_path / "bad", 12, 6)
    rewrite_tar(shard_dir / "train-000001.tar", lambda name, data: data[:30] if name == "train_00000007.png" else data)
    good = {}  # pixels -> label of every decodable stored sample
    for url in shard_paths(shard_dir, "train"):
        for sample in read_tar_samples(url):
            if sample["__key__"] != "train_00000007":
                good[PIXELS(decode_image(sample["png"])).numpy().tobytes()] = int(sample["cls"])
    assert len(good) == 11
    loader = train_loader(shard_dir, StreamPosition(seed=1, epoch=0, rank=0, world=1, workers=0, batches=9),
                          transform=PIXELS, batch_size=4, shuffle_buffer=8)
    patched = 0
    before = skipped_samples()
    for images, labels in loader:
        holes = skipped_samples() - before  # corrupt samples met while building this batch (in-process)
        before += holes
        keys = [x.numpy().tobytes() for x in images]
        assert all(good.get(k) == int(y) for k, y in zip(keys, labels))  # every entry: a good sample, its label
        n_good = len(images) - holes
        for i in range(holes):  # the repeats sit at the end and copy the batch's own good samples in order
            assert torch.equal(images[n_good + i], images[i % n_good]) and labels[n_good + i] == labels[i % n_good]
        patched += holes
    assert patched >= 1  # 36 draws of 12 samples: the corrupt one was met


def test_transform_errors_propagate_instead_of_counting_as_corrupt(sets):
    def broken(img):
        raise ZeroDivisionError("bug in the transform")

    before = skipped_samples()
    with pytest.raises(ZeroDivisionError, match="bug in the transform"):
        train_batches(sets[3], transform=broken)
    with pytest.raises(ZeroDivisionError):
        list(eval_loader(sets[3], split="train", transform=broken, batch_size=2, num_workers=0, rank=0, world_size=1))
    assert skipped_samples() == before


def test_in_process_stream_leaves_the_callers_rngs_alone(sets):
    import random

    import numpy as np

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    train_batches(sets[3], transform=finetune_transform(16, MEAN, STD, **BFT), num_workers=0)
    assert torch.equal(torch.get_rng_state(), states[0])  # a resumed trainer's RNG stays on its trajectory
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def damage(path, how: str) -> None:
    """Damage one tar in place: cut it at the start of its 3rd sample (a member boundary: what remains is a valid,
    shorter tar) or inside that sample's image, or overwrite it with zeros / random bytes, or empty it."""
    import os
    import random
    import tarfile

    size = path.stat().st_size
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third = sorted({m.name.split(".")[0] for m in members})[2]
    if how == "cut_at_sample":
        os.truncate(path, min(m.offset for m in members if m.name.startswith(third + ".")))
    elif how == "cut_in_image":
        image = next(m for m in members if m.name == f"{third}.png")
        os.truncate(path, image.offset_data + 10)
    else:
        path.write_bytes({"zeros": bytes(size), "garbage": random.Random(0).randbytes(size), "empty": b""}[how])


@pytest.mark.parametrize(("how", "kept", "corrupt"), [("cut_at_sample", 2, 0), ("cut_in_image", 2, 1),
                                                      ("zeros", 0, 0), ("garbage", 0, 0), ("empty", 0, 0)])
def test_damaged_shard_counts_one_skipped_shard_per_read_and_keeps_its_good_samples(tmp_path, how, kept, corrupt):
    """Every read of a shard that ends before the samples meta.json lists counts once as a skipped shard (and once
    as a skipped sample), whether the tar raises or just ends early; a sample cut in half counts as corrupt too.
    The samples before the damage are used."""
    from livt_ds.data.pipeline import skipped_shards

    shard_dir = make_shard_set(tmp_path / "s", 12, 4)
    keys = all_keys(shard_dir)
    damage(shard_dir / "train-000001.tar", how)
    samples, shards = skipped_samples(), skipped_shards()
    seen = [k for *_, ks in eval_loader(shard_dir, split="train", transform=MGP, batch_size=4, num_workers=0, rank=0,
                                         world_size=1, return_keys=True) for k in ks]  # every shard read once
    assert seen == keys[:4 + kept] + keys[8:]
    assert skipped_shards() - shards == 1
    assert skipped_samples() - samples == 1 + corrupt

    shards = skipped_shards()
    batches = train_batches(shard_dir, world_size=1, num_batches=6)  # 24 draws from an endless tape of 3 shards
    assert len(batches) == 6 and all(x.shape[0] == 4 for x, _ in batches)
    assert skipped_shards() > shards
