"""MGP crops resized on the device (``PretrainCrop(resize_on_device=True)`` + ``CropBatch``) against the same crops
resized in the loader worker, and through real loaders with and without workers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datafixtures import make_shard_set, rewrite_tar
from PIL import Image
from torchvision import transforms as T

from livt_ds.data.device_crop import CropBatch
from livt_ds.data.pipeline import StreamPosition, seeded_rngs, skipped_samples, train_loader
from livt_ds.data.shards import read_tar_samples
from livt_ds.data.transforms import PretrainCrop, to_model_input

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def smooth_image(width: int, height: int) -> bytes:
    """Red = x, green = y, blue = their mean (0-255 across the image), as a PNG: a crop's pixels say where it came
    from, and resampling filters agree on it up to rounding."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    buf = io.BytesIO()
    Image.fromarray(np.stack([xs, ys, (xs + ys) / 2], -1).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def crops(data: bytes, size: int, seeds: range, on_device: bool) -> torch.Tensor | CropBatch:
    """The crops of ``data`` drawn with each seed, batched as the loader batches them."""
    crop = PretrainCrop(size, resize_on_device=on_device)
    items = []
    for seed in seeds:
        with seeded_rngs(seed):
            items.append(crop(crop.load(crop.draw(data))))
    return crop.collate(items)


@pytest.mark.parametrize(("width", "height", "size"), [(300, 200, 96), (300, 200, 224), (90, 120, 64)])
def test_device_resize_gives_the_worker_resize_crop_for_crop(width, height, size):
    """The same boxes and flips, resized by the separable weight matrices instead of torch's uint8 kernel: equal up
    to the rounding of fixed-point weights (two levels at most, nearly nowhere), pixel for pixel (a wrong box, scale,
    flip or filter is off by tens of levels)."""
    data, seeds = smooth_image(width, height), range(24)
    worker = crops(data, size, seeds, on_device=False)
    batch = crops(data, size, seeds, on_device=True)
    assert isinstance(batch, CropBatch) and batch.canvas.dtype == torch.uint8
    assert max(batch.canvas.shape[2:]) <= max(width, height) and batch.canvas.shape[2:] != (size, size)
    device = batch.resized()
    assert device.shape == worker.shape == (24, 3, size, size)
    diff = (device - worker.float()).abs()
    assert diff.max() <= 2 and diff.mean() < 0.02
    flipped = device[:, 0, :, 0].mean(1) > device[:, 0, :, -1].mean(1)  # red (x) falls from left to right
    assert 0 < int(flipped.sum()) < 24 and torch.equal(flipped, batch.flips)
    normalised = to_model_input(batch, MEAN, STD)
    expected = (worker.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert normalised.is_contiguous() and (normalised - expected).abs().max() <= 2 / 255 / min(STD) + 1e-5


def test_crops_longer_than_twice_the_output_are_resized_in_the_worker():
    """A large PNG (no reduced decode) at 32 px: crops over 64 px a side are resized by the worker, so the canvas a
    worker sends stays within 2 * img_size a side; the result is still the worker resize's."""
    data, seeds = smooth_image(1600, 1200), range(8)
    batch = crops(data, 32, seeds, on_device=True)
    assert max(batch.canvas.shape[2:]) <= 64
    diff = (batch.resized() - crops(data, 32, seeds, on_device=False).float()).abs()
    assert diff.max() <= 2 and diff.mean() < 0.02


@pytest.mark.parametrize(("height", "width"), [(224, 256), (375, 500), (37, 500), (500, 20), (1, 1), (3000, 4000)])
def test_crop_box_draws_what_get_params_draws(height, width):
    """The same random calls as torchvision's ``RandomResizedCrop.get_params``: the same box from the same state, and
    the same state after it (the flip drawn next is the same too), including the centred fallback of thin images."""
    crop, image = PretrainCrop(224), torch.zeros(1, dtype=torch.uint8).expand(3, height, width)
    for seed in range(300):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]), torch.rand(1)
        torch.manual_seed(seed)
        assert (crop.crop_box(height, width), torch.rand(1)) == expected, seed


def test_loader_workers_send_crop_batches_that_resize_where_the_batch_goes(tmp_path):
    """A train loader with a worker (forkserver) and one without yield the same crop batches, corrupt samples
    included (one not an image at all, one cut in its pixels: its header reads, its decode fails): they are counted
    and their places taken by good crops; every batch moves with ``.to`` and resizes to the worker-resize output."""
    shard_dir = make_shard_set(tmp_path / "set", 12, 6)
    broken = {"train_00000007.png": lambda data: data[:30], "train_00000008.png": lambda data: data[: len(data) // 2]}
    rewrite_tar(shard_dir / "train-000001.tar", lambda name, data: broken[name](data) if name in broken else data)
    stored = {s["__key__"]: s["png"] for s in read_tar_samples(str(shard_dir / "train-000001.tar"))}
    cut = PretrainCrop(12).draw(stored["train_00000008"])
    with pytest.raises(OSError):  # the cut sample fails in the decode, after its draws
        PretrainCrop(12).load(cut)

    def batches(workers: int, on_device: bool) -> list:
        position = StreamPosition(seed=3, epoch=0, rank=0, world=1, workers=workers, batches=6)
        loader = train_loader(shard_dir, position, transform=PretrainCrop(12, resize_on_device=on_device),
                              batch_size=4, shuffle_buffer=8)  # fmt: skip
        return list(loader)

    before = skipped_samples()
    with_worker = batches(1, True)
    assert skipped_samples() > before  # the corrupt sample was met (in the worker) and counted
    in_process = batches(0, True)
    worker_resized = batches(0, False)
    assert len(with_worker) == len(in_process) == len(worker_resized) == 6
    for (a, ya), (b, yb), (c, yc) in zip(with_worker, in_process, worker_resized):
        assert isinstance(a, CropBatch) and len(a) == 4 and torch.equal(ya, yb) and torch.equal(ya, yc)
        assert torch.equal(a.canvas, b.canvas) and torch.equal(a.sizes, b.sizes) and torch.equal(a.flips, b.flips)
        resized = to_model_input(a.to("cpu", non_blocking=True), MEAN, STD)
        assert (resized - to_model_input(c, MEAN, STD)).abs().max() <= 2 / 255 / min(STD) + 1e-5
