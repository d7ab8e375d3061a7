"""The benchmark's inputs, its timed steps and the figures made of them.

Inputs: ``synthetic`` is one random batch already on the device (compute only); ``shards`` is the trainer's real
``train_loader`` stream (tar read, decode, augmentation in worker processes), copied to the device by the step.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from livt_ds.bench.runners import Runner
from livt_ds.data.pipeline import StreamPosition, train_loader
from livt_ds.tasks import Task

GIB = 2**30
FIELDS = {
    "images_per_s": "batch * steps / synchronised wall time of the timed steps (after the warm-up)",
    "step_ms": "wall time per timed step",
    "data_wait_ms": "host time per step spent waiting for the next batch (shards: the loader; ~0 when it keeps up)",
    "model_tflops": "images_per_s * 3 * forward FLOPs of the transformer layers (docs/gpu.md)",
    "model_tflops_with_embed_heads": "the same with patch embedding, decoder embed/prediction and classifier head",
    "share_of_peak": "model_tflops / peak_tflops (GPU only)",
    "peak_mem_gib": "torch.cuda.max_memory_allocated over warm-up + timed steps (reset first; GPU only)",
    "mem_start_gib": "torch.cuda.memory_allocated before the first step (model + optimizer state so far; GPU only)",
    "losses": "the training loss of every step, warm-up included (same seed and batch: comparable across paths)",
    "ratio_project_over_baseline": "project entry: its images/s over the like-for-like eager entry's (pure-foreach "
                                   "when measured), same stage and input; eager entry: the first project "
                                   "entry's images/s over its own",
}


def synthetic_batches(batch: int, img_size: int, num_classes: int, device: torch.device) -> Iterator[tuple]:
    """The same random batch on the device every step, restored in place (mixup / cutmix edit it in place)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    pristine = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    work = torch.empty_like(pristine)
    while True:
        work.copy_(pristine)
        yield work, labels


def shard_batches(shards: Path, task: Task, batch: int, num_batches: int, *, workers: int, seed: int,
                  pin_memory: bool) -> Iterator[tuple]:
    """The trainer's ``train_loader`` stream (host tensors; the runner copies them to the device)."""
    position = StreamPosition(seed=seed, epoch=0, rank=0, world=1, workers=workers, batches=num_batches)
    yield from train_loader(shards, position, split="train", transform=task.train_transform(), batch_size=batch,
                            pin_memory=pin_memory)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(runner: Runner, batches: Iterator[tuple], warmup: int, steps: int) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` steps: synchronised wall time of the timed steps, host wait for data, peak
    memory and every step's loss (read after the timed steps, so no step waits for the host)."""
    device = runner.device
    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    mem_start = torch.cuda.memory_allocated(device) if cuda else None
    losses = [runner.step(*next(batches)).detach() for _ in range(warmup)]
    _sync(device)
    wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        losses.append(runner.step(*batch).detach())
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "data_wait_s": wait, "losses": [float(x.float().cpu()) for x in losses],
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
            "mem_start_gib": mem_start / GIB if cuda else None}


def summarise(raw: dict[str, Any], batch: int, steps: int, flops: dict[str, int], peak: float,
              cuda: bool) -> dict[str, Any]:
    """images/s, ms/step, host wait for data, model TFLOP/s (layers only, and with embeddings / heads), share of
    the peak, memory and the losses of one ``measure``."""
    ips = batch * steps / raw["elapsed_s"]
    tflops = ips * flops["train"] / 1e12
    loss = raw["losses"][-1]
    return {
        "images_per_s": round(ips, 2), "step_ms": round(1000 * raw["elapsed_s"] / steps, 3),
        "data_wait_ms": round(1000 * raw["data_wait_s"] / steps, 3),
        "model_tflops": round(tflops, 3),
        "model_tflops_with_embed_heads": round(ips * flops["train_with_extras"] / 1e12, 3),
        "share_of_peak": round(tflops / peak, 4) if cuda else None,
        "peak_mem_gib": None if raw["peak_mem_gib"] is None else round(raw["peak_mem_gib"], 3),
        "mem_start_gib": None if raw["mem_start_gib"] is None else round(raw["mem_start_gib"], 3),
        "loss": loss, "loss_finite": math.isfinite(loss), "losses": raw["losses"],
    }
