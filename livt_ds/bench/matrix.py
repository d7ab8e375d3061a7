"""Every run of a benchmark's settings, as one JSON document that grows entry by entry.

Per stage, one model per (path, variant): the project path once per ``ds_adam`` variant, the eager path once per
``eager`` variant; each model is timed on every input. Then the ZeRO memory sweep of the pretraining model (GPU only;
ZeRO-3 last: DeepSpeed 0.19.8 does not free a ZeRO-3 engine in-process). A run that fails is recorded with its
error and the others go on. ``on_update(document)`` is called after every finished entry, so a caller that writes
the document each time keeps what finished when the benchmark is cut short (``document["complete"]`` is False
until the end).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from livt_ds import dist
from livt_ds.bench.runners import Runner, eager_runner, project_runner, relative
from livt_ds.bench.settings import LIKE_FOR_LIKE, STAGES, ZERO_CONFIGS, Settings, make_recipe, synthetic_meta
from livt_ds.bench.timing import FIELDS, free_memory, measure, shard_batches, summarise, synthetic_batches
from livt_ds.config import load_ds_config
from livt_ds.data.shards import load_meta
from livt_ds.data.synthetic import generate_shards
from livt_ds.models.flops import FORMULA, flops_per_image
from livt_ds.recipes import find
from livt_ds.tasks import Task, build_task

Log = Callable[[str], None]
Update = Callable[[dict[str, Any]], None]


@dataclass
class Context:
    settings: Settings
    device: torch.device
    meta: dict[str, Any]
    flops: dict[str, dict[str, int]]


def planned_runs(s: Settings) -> list[tuple[str, str]]:
    """(path, variant) pairs in the order they run: one project run per ``ds_adam`` variant, then the eager ones."""
    runs = [("project", v) for v in s.ds_adam] if "project" in s.paths else []
    return runs + ([("baseline", v) for v in s.eager] if "baseline" in s.paths else [])


def planned_entries(s: Settings) -> int:
    """How many entries a complete run of ``s`` records (the matrix and the ZeRO sweep)."""
    zero = len(s.zero_stages) if s.cuda else 0
    return len(s.stages) * len(planned_runs(s)) * len(s.inputs) + zero


def _error(exn: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"{type(exn).__name__}: {exn}"[:2000]


def _runner(ctx: Context, path: str, variant: str, recipe: Any, task: Task) -> Runner:
    s = ctx.settings
    if path == "project":
        return project_runner(recipe, task, s.ds_config, compile_model=s.compile, adam=variant)
    return eager_runner(s, recipe, task, ctx.device, compile_model=s.compile, variant=variant)


def _batches(ctx: Context, task: Task, stage: str, mode: str) -> tuple[Iterator, int]:
    """(batch iterator, warm-up steps) for one input. The shard stream's warm-up is 2 batches per worker longer,
    so that the loader's initial burst of prefetched batches is drained before the clock starts."""
    s = ctx.settings
    batch = s.batches[stage]
    if mode == "synthetic":
        return synthetic_batches(batch, s.model.img_size, ctx.meta["num_classes"], ctx.device), s.warmup
    warmup = s.warmup + 2 * s.workers
    return shard_batches(s.shards, task, batch, warmup + s.steps, workers=s.workers, seed=s.seed,
                         pin_memory=ctx.device.type == "cuda"), warmup


def run_stage(ctx: Context, stage: str, log: Log, done: Callable[[dict[str, Any]], None]) -> None:
    """Every (path, variant, input) run of one stage; ``done(entry)`` after each."""
    s = ctx.settings
    batch = s.batches[stage]
    recipe = make_recipe(s, stage, batch)
    task = build_task(stage, recipe, ctx.meta)
    cuda = ctx.device.type == "cuda"
    for path, variant in planned_runs(s):
        base = {"stage": stage, "path": path, "variant": variant, "batch": batch, "compiled": s.compile}
        try:
            log(f"{stage}/{path}/{variant}: building {s.model.name} at {s.model.img_size} px, micro-batch {batch}")
            runner = _runner(ctx, path, variant, recipe, task)
        except Exception as exn:  # noqa: BLE001 - recorded, the other runs go on
            free_memory(ctx.device)
            for mode in s.inputs:
                done({**base, "input": mode, "error": _error(exn)})
            continue
        for mode in s.inputs:
            entry = {**base, "input": mode, **runner.info}
            try:
                batches, warmup = _batches(ctx, task, stage, mode)
                raw = measure(runner, batches, warmup, s.steps)
                batches.close()
                entry.update(warmup=warmup, steps=s.steps,
                             **summarise(raw, batch, s.steps, ctx.flops[stage], s.peak_tflops, cuda))
                log(f"{stage}/{path}/{variant}/{mode}: {entry['images_per_s']:.1f} images/s, "
                    f"{entry['step_ms']:.1f} ms/step, loss {entry['loss']:.4g}")
            except Exception as exn:  # noqa: BLE001
                entry["error"] = _error(exn)
            free_memory(ctx.device)
            done(entry)
        runner.close()
        del runner
        free_memory(ctx.device)


def add_ratios(entries: list[dict[str, Any]]) -> None:
    """``ratio_project_over_baseline`` (images/s) per (stage, input). A project entry: its own images/s over the
    like-for-like eager entry's (``pure-foreach``; the first eager entry when that was not measured). An eager
    entry: the first project entry's images/s over its own. None where either run failed or is missing."""
    eager: dict[tuple, dict[str, float | None]] = {}
    first_project: dict[tuple, float | None] = {}
    for e in entries:
        key = (e["stage"], e["input"])
        if e["path"] == "baseline":
            eager.setdefault(key, {})[e["variant"]] = e.get("images_per_s")
        else:
            first_project.setdefault(key, e.get("images_per_s"))
    for e in entries:
        key = (e["stage"], e["input"])
        if e["path"] == "project":
            variants = eager.get(key, {})
            p, b = e.get("images_per_s"), variants.get(LIKE_FOR_LIKE, next(iter(variants.values()), None))
        else:
            p, b = first_project.get(key), e.get("images_per_s")
        e["ratio_project_over_baseline"] = round(p / b, 4) if p and b else None


def zero_sweep(ctx: Context, log: Log, done: Callable[[dict[str, Any]], None]) -> None:
    """Peak GPU memory and images/s of the pretraining model (MAE) under each requested ZeRO config, synthetic input."""
    s = ctx.settings
    recipe = make_recipe(s, "pretrain", s.zero_batch)
    task = build_task("pretrain", recipe, ctx.meta)
    for key in sorted(s.zero_stages, key=lambda k: k == "3"):  # ZeRO-3 is not freed in-process: last
        entry: dict[str, Any] = {"zero": key, "ds_config": ZERO_CONFIGS[key], "stage": "pretrain",
                                 "batch": s.zero_batch}
        try:
            log(f"zero sweep: {key} ({ZERO_CONFIGS[key]})")
            runner = project_runner(recipe, task, find("ds_config", ZERO_CONFIGS[key]), compile_model=False)
            try:
                batches = synthetic_batches(s.zero_batch, s.model.img_size, ctx.meta["num_classes"], runner.device)
                raw = measure(runner, batches, min(2, s.warmup), s.zero_steps)
                entry.update(summarise(raw, s.zero_batch, s.zero_steps, ctx.flops["pretrain"], s.peak_tflops, True))
            finally:
                runner.close()
                del runner
        except Exception as exn:  # noqa: BLE001
            entry["error"] = _error(exn)
        free_memory(ctx.device)
        done(entry)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _settings_record(s: Settings, device: torch.device, meta: dict[str, Any], generated: bool) -> dict[str, Any]:
    return {
        "device": _device_name(device), "model": s.model.name, "img_size": s.model.img_size,
        "patch_size": s.model.patch_size,
        "decoder": {"dim": s.model.decoder_dim, "depth": s.model.decoder_depth, "heads": s.model.decoder_heads},
        "mask_ratio": s.model.mask_ratio,
        "recipes": {stage: relative(path) for stage, path in s.recipe_files.items()}, "recipe_overrides": s.overrides,
        "batches": s.batches, "steps": s.steps, "warmup": s.warmup, "workers": s.workers,
        "ds_config": relative(s.ds_config), "ds_adam": s.ds_adam, "eager": s.eager, "compile": s.compile,
        "finetune_targets": s.finetune_targets, "num_classes": meta["num_classes"],
        "shards": str(s.shards) if s.shards and not generated else None, "peak_tflops": s.peak_tflops,
        "versions": {"torch": torch.__version__, "deepspeed": version("deepspeed"), "timm": version("timm"),
                     "cuda": torch.version.cuda or "", "python": sys.version.split()[0]},
        "command": sys.argv,
    }


def run(s: Settings, log: Log, on_update: Update | None = None) -> dict[str, Any]:
    """Optional shard generation, the (stage, path, variant, input) matrix, the ZeRO sweep: the JSON document,
    handed to ``on_update`` after each finished entry and returned at the end."""
    t0 = time.time()
    tmp = None
    if "shards" in s.inputs and s.shards is None and s.stages:
        tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
        log(f"generating {s.gen_images} JPEGs of {s.gen_size[0]}x{s.gen_size[1]} as a shard set under {tmp}")
        s.shards = generate_shards(tmp, images=s.gen_images, size=s.gen_size, classes=s.gen_classes,
                                   workers=max(1, min(s.workers, os.cpu_count() or 1)))
        s.notes.append(f"shards: generated {s.gen_images} JPEGs {s.gen_size[0]}x{s.gen_size[1]} q90 "
                       f"({time.time() - t0:.1f} s)")
    try:
        dist.init_distributed()
        device = torch.device("cuda", torch.cuda.current_device()) if s.cuda else torch.device("cpu")
        meta = load_meta(s.shards) if s.shards is not None else synthetic_meta(s.num_classes)
        flops = {stage: flops_per_image(stage, s.recipes[stage].model, num_classes=meta["num_classes"])
                 for stage in STAGES}
        if load_ds_config(s.ds_config).get("zero_optimization", {}).get("stage") == 3:
            s.notes.append("ZeRO-3 engines are not freed in-process by DeepSpeed 0.19.8: the memory of earlier "
                           "ZeRO-3 runs shows in mem_start_gib / peak_mem_gib of the later ones")
        zero: Any = [] if s.zero_stages else None
        if s.zero_stages and not s.cuda:
            zero = {"skipped": "the ZeRO memory sweep needs a GPU (peak memory is torch.cuda's); run it with CUDA"}
            log(zero["skipped"])
        doc: dict[str, Any] = {
            "complete": False, "planned_entries": planned_entries(s), "finished_entries": 0,
            "settings": _settings_record(s, device, meta, tmp is not None), "flops_per_image": flops,
            "flops_formula": FORMULA, "fields": FIELDS, "notes": s.notes, "results": [], "zero_stages": zero,
            "wall_s": 0.0,
        }

        def done(entry: dict[str, Any], into: list[dict[str, Any]]) -> None:
            into.append(entry)
            add_ratios(doc["results"])
            doc["finished_entries"] += 1
            doc["wall_s"] = round(time.time() - t0, 1)
            if on_update is not None:
                on_update(doc)

        if on_update is not None:
            on_update(doc)
        ctx = Context(s, device, meta, flops)
        for stage in s.stages:
            run_stage(ctx, stage, log, lambda entry: done(entry, doc["results"]))
        if isinstance(zero, list):
            zero_sweep(ctx, log, lambda entry: done(entry, zero))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    doc.update(complete=True, wall_s=round(time.time() - t0, 1))
    if on_update is not None:
        on_update(doc)
    return doc
