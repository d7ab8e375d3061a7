"""Training-step benchmark: the project's DeepSpeed path against a plain-PyTorch loop, in one process.

For each stage (MGP = masked pretraining, BFT = balanced fine-tuning), path and input mode it times
``--steps`` training steps after ``--warmup`` steps and reports images/s, step time, model TFLOP/s (the
analytic count in docs/gpu.md), share of the 989 TFLOP/s dense bf16 peak, peak GPU memory and the
project/baseline ratio.

Paths
- ``project``: what ``livt_ds/engine.py`` does: model from the task object (registry), ``optim.param_groups``,
  ``deepspeed.initialize`` with ``resolve_ds_config(load_ds_config(--ds-config), recipe, 1)`` (bf16 ZeRO-2 on GPU,
  ``ds_configs/cpu_fp32.json`` on CPU); a step = ``apply_lr`` + ``task.prepare_batch`` (mixup/cutmix on the
  loader's host tensors, as the trainer does) + cast to the engine dtype (non_blocking) + forward + loss +
  ``engine.backward`` + ``engine.step``.
- ``baseline``: the same model, parameter groups and loss in a plain eager loop: ``torch.optim.AdamW``
  (fused on CUDA), ``torch.autocast("cuda", bfloat16)`` on GPU (fp32 on CPU), pinned host memory, mixup on the
  device, ``loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)``.
- ``--compile``: DeepSpeed 0.19.8 has ``DeepSpeedEngine.compile(backend, compile_kwargs)``, which calls
  ``nn.Module.compile()`` on the wrapped module in place (ZeRO's parameter hooks stay where they are); the
  project path uses it after ``deepspeed.initialize``. The baseline then uses ``model.compile()`` too, so the
  ratio stays like for like.

Inputs
- ``synthetic``: random tensors already on the device (compute only).
- ``shards``: the real ``train_loader`` stream (``--workers`` processes: tar read, decode, augmentation),
  copied to the device. Without ``--shards DIR`` a shard set of ``--gen-images`` photo-like JPEGs
  (``livt_ds.data.synthetic``) is generated in a temporary folder first (through ``make_shards --source
  imagefolder``). The warm-up of this
  mode is ``--warmup + 2 * --workers`` steps so the loader's initial burst of prefetched batches is drained.

``--ds-adam config,torch-fused,deepspeed-fused``: one project run per AdamW implementation (the JSON as written,
i.e. ``torch_adam``, torch's foreach AdamW; torch's AdamW with ``fused=True``; DeepSpeed's JIT-built FusedAdam).

``--zero-stages 1,2,3,2offload``: peak GPU memory (and images/s) of the MGP model per ZeRO config
(``ds_configs/zero{1,2,3}_bf16.json``, ``zero2_offload_bf16.json``) at ``--zero-batch``; skipped on CPU.
Stage 3 runs last: DeepSpeed 0.19.8 does not free a ZeRO-3 engine in-process. ``--stages none`` runs the sweep alone.

Recipes: the shipped ones, ``configs/mgp_vit_large_imagenet_lt.yaml`` and ``configs/bft_vit_large_imagenet_lt.yaml``
on GPU, ``configs/tiny_mgp.yaml`` and ``configs/tiny_bft.yaml`` on CPU (model, mask ratio, decoder, drop path,
augmentation, loss, learning rate, betas, layer decay), with ``--model``/``--img-size``/``--patch-size``/
``--decoder`` and the micro-batch on top; weights from scratch (no ``model.init``) and one optimizer step per
micro-batch (no accumulation), so that a timed step is a whole training step.

FLOPs per image: ``livt_ds.models.flops``. ``run`` returns the JSON document (settings, FLOPs, one entry per
run, the ZeRO sweep); ``scripts/bench_train.py`` is the command line (stdout: the document, stderr: a table).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from livt_ds.config import ModelConfig, Recipe, base_lr, load_ds_config, load_recipe, resolve_ds_config
from livt_ds.data.synthetic import generate_shards
from livt_ds.errors import ConfigError
from livt_ds.models.flops import FORMULA, flops_per_image
from livt_ds.models.registry import MODEL_SIZES
from livt_ds.optim import apply_lr, param_groups

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
STAGES = {"mgp": "pretrain", "bft": "finetune"}
PATHS = ("project", "baseline")
INPUTS = ("synthetic", "shards")
ZERO_CONFIGS = {
    "1": "ds_configs/zero1_bf16.json",
    "2": "ds_configs/zero2_bf16.json",
    "3": "ds_configs/zero3_bf16.json",
    "2offload": "ds_configs/zero2_offload_bf16.json",
}
# Per-GPU micro-batches of the reference figures (docs/gpu.md); other sizes scale from the base ones.
GPU_BATCHES = {"vit_base": {"mgp": 512, "bft": 256}, "vit_large": {"mgp": 256, "bft": 128},
               "vit_huge": {"mgp": 128, "bft": 64}}
GIB = 2**30
# --ds-adam: the config's optimizer block as written; torch's AdamW with fused=True (passed through DeepSpeed's
# torch_adam path); DeepSpeed's own FusedAdam (JIT-built; needs TORCH_CUDA_ARCH_LIST without the "a" suffix).
ADAM_VARIANTS = ("config", "torch-fused", "deepspeed-fused")
FIELDS = {
    "images_per_s": "batch * steps / synchronised wall time of the timed steps (after the warm-up)",
    "step_ms": "wall time per timed step",
    "data_wait_ms": "host time per step spent waiting for the next batch (shards: the loader; ~0 when it keeps up)",
    "model_tflops": "images_per_s * 3 * forward FLOPs of the transformer layers (docs/gpu.md)",
    "model_tflops_with_embed_heads": "the same with patch embedding, decoder embed/prediction and classifier head",
    "share_of_peak": "model_tflops / peak_tflops (GPU only)",
    "peak_mem_gib": "torch.cuda.max_memory_allocated over warm-up + timed steps (reset first; GPU only)",
    "mem_start_gib": "torch.cuda.memory_allocated before the first step (model + optimizer state so far; GPU only)",
    "ratio_project_over_baseline": "images_per_s of the project path / the baseline's, same stage and input",
}
# The recipes a real run uses (paths relative to the repository), per device: the GPU figures are for the paper's
# ImageNet-LT recipes, the CPU run is a smoke test of the tiny ones.
RECIPES = {"cuda": {"mgp": "configs/mgp_vit_large_imagenet_lt.yaml", "bft": "configs/bft_vit_large_imagenet_lt.yaml"},
           "cpu": {"mgp": "configs/tiny_mgp.yaml", "bft": "configs/tiny_bft.yaml"}}
# What the benchmark changes in them: weights from scratch (no MGP run to load) and no gradient accumulation
# (train.batch_size from the micro-batch), so that every timed step is a whole optimizer step.
BENCH_OVERRIDES = ("model.init=", "train.batch_size=null")


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    recipes = f"{RECIPES['cuda']['mgp']} on GPU, {RECIPES['cpu']['mgp']} on CPU"
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu (or no CUDA): the tiny recipes (vit_test at 32 px), tiny batches, a few steps")
    p.add_argument("--model", choices=list(MODEL_SIZES), help=f"[the MGP recipe's: {recipes}]")
    p.add_argument("--img-size", type=int, help="[the MGP recipe's]")
    p.add_argument("--patch-size", type=int, help="[the MGP recipe's]")
    p.add_argument("--decoder", help="MGP decoder DIM,DEPTH,HEADS [the MGP recipe's]")
    p.add_argument("--stages", default="mgp,bft", help="comma list of mgp,bft, or 'none' [mgp,bft]")
    p.add_argument("--paths", default="project,baseline", help="comma list of project,baseline [both]")
    p.add_argument("--input", choices=("synthetic", "shards", "both"), default="both", help="[both]")
    p.add_argument("--shards", help="shard set folder (make_shards); default: generate one in a temporary folder")
    p.add_argument("--gen-images", type=int, help="images of the generated shard set [2048 on GPU, 32 on CPU]")
    p.add_argument("--gen-size", help="WxH of the generated JPEGs [500x375 on GPU, 40x36 on CPU]")
    p.add_argument("--gen-classes", type=int, help="classes of the generated set [100 on GPU, 4 on CPU]")
    p.add_argument("--workers", type=int,
                   help="train_loader worker processes [min(14, cores - 2) on GPU, the recipe's on CPU]")
    p.add_argument("--mgp-batch", type=int, help="MGP micro-batch [256 vit_large, 512 vit_base; the recipe's on CPU]")
    p.add_argument("--bft-batch", type=int,
                   help="BFT micro-batch, even (mixup) [128 vit_large, 256 vit_base; the recipe's on CPU]")
    p.add_argument("--bft-targets", choices=("soft", "hard"), default="soft",
                   help="soft: the recipe's mixup / cutmix / label smoothing; hard: int labels, all three off [soft]")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="BFT classes when there is no shard set (synthetic only) [1000]")
    p.add_argument("--steps", type=int, help="timed steps [30 on GPU, 3 on CPU]")
    p.add_argument("--warmup", type=int, help="untimed steps first [8 on GPU, 1 on CPU]")
    p.add_argument("--ds-config", help="DeepSpeed JSON [ds_configs/zero2_bf16.json on GPU, cpu_fp32.json on CPU]")
    p.add_argument("--ds-adam", default="config",
                   help=f"comma list of project-path optimizers to time: {', '.join(ADAM_VARIANTS)} [config]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both paths (engine.compile() / model.compile())")
    p.add_argument("--zero-stages", default="", help="memory sweep of the MGP model, e.g. 1,2,3,2offload (GPU only)")
    p.add_argument("--zero-batch", type=int, help="micro-batch of the ZeRO sweep [the MGP batch]")
    p.add_argument("--zero-steps", type=int, default=5, help="timed steps per ZeRO config [5]")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 peak for the share [989]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="also write the JSON document here")
    return p



@dataclass
class Settings:
    """The resolved benchmark settings (CLI defaults filled for the device)."""

    cuda: bool
    recipe_files: dict[str, Path]  # stage -> configs/*.yaml
    overrides: list[str]  # applied to both recipes: BENCH_OVERRIDES, model name and sizes, decoder, workers, seed
    recipes: dict[str, Recipe]  # stage -> its recipe with ``overrides`` (micro-batch and data path: make_recipe)
    stages: list[str]
    paths: list[str]
    inputs: list[str]
    shards: Path | None
    gen_images: int
    gen_size: tuple[int, int]
    gen_classes: int
    workers: int
    batches: dict[str, int]
    bft_targets: str
    num_classes: int
    steps: int
    warmup: int
    ds_config: Path
    ds_adam: list[str]
    compile: bool
    zero_stages: list[str]
    zero_batch: int
    zero_steps: int
    peak_tflops: float
    seed: int
    json_out: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> ModelConfig:
        """The model of the MGP recipe (name, sizes, mask ratio, decoder); BFT's has the same name and sizes."""
        return self.recipes["mgp"].model



def _split(text: str, valid: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
    bad = [t for t in items if t not in valid]
    if bad:
        raise SystemExit(f"bench_train: {what} {bad} unknown; valid: {', '.join(valid)}")
    return items


def _decoder(text: str | None) -> list[str]:
    """--decoder DIM,DEPTH,HEADS as recipe overrides (none: the recipe's decoder)."""
    if text is None:
        return []
    try:
        dim, depth, heads = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"bench_train: --decoder {text!r}: expected DIM,DEPTH,HEADS, e.g. 256,4,8") from None
    return [f"model.decoder_dim={dim}", f"model.decoder_depth={depth}", f"model.decoder_heads={heads}"]


def _gen_size(text: str | None, cuda: bool) -> tuple[int, int]:
    if text is None:
        return (500, 375) if cuda else (40, 36)
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bench_train: --gen-size {text!r}: expected WxH, e.g. 500x375") from None
    return w, h


def _default_batches(model: str, cuda: bool, recipes: dict[str, Recipe]) -> dict[str, int]:
    if not cuda:
        batches = {st: r.train.micro_batch for st, r in recipes.items()}
        if None in batches.values():
            raise SystemExit(f"bench_train: the recipes {RECIPES['cpu']} set no train.micro_batch; pass --mgp-batch "
                             "and --bft-batch")
        return batches
    if model in GPU_BATCHES:
        return dict(GPU_BATCHES[model])
    return {"mgp": 1024, "bft": 512}  # the small sizes


def _load(path: Path, overrides: list[str]) -> Recipe:
    try:
        return load_recipe(path, overrides)
    except ConfigError as exn:
        raise SystemExit(f"bench_train: {exn}") from None


def _recipes(args: argparse.Namespace, cuda: bool, files: dict[str, Path]) -> tuple[list[str], dict[str, Recipe]]:
    """(overrides for both stages, stage -> recipe): the CLI's model, sizes and decoder, else the MGP recipe's
    model and sizes for both stages (and each recipe's decoder, drop path, augmentation, loss, optimizer)."""
    given = [f"model.{key}={value}" for key, value in (("name", args.model), ("img_size", args.img_size),
                                                       ("patch_size", args.patch_size)) if value]
    mgp = _load(files["mgp"], [*BENCH_OVERRIDES, *given, *_decoder(args.decoder)])
    cores = os.cpu_count() or 2
    workers = args.workers if args.workers is not None else (
        max(1, min(14, cores - 2)) if cuda else mgp.data.num_workers)
    m = mgp.model
    overrides = [*BENCH_OVERRIDES, f"model.name={m.name}", f"model.img_size={m.img_size}",
                 f"model.patch_size={m.patch_size}", *_decoder(args.decoder), f"data.num_workers={workers}",
                 f"train.seed={args.seed}"]
    return overrides, {st: _load(path, overrides) for st, path in files.items()}


def resolve_settings(args: argparse.Namespace, cuda: bool) -> Settings:
    """Load the recipes, fill the device-dependent defaults and check the combination; exits with a message on a
    bad one."""
    files = {st: REPO / path for st, path in RECIPES["cuda" if cuda else "cpu"].items()}
    overrides, recipes = _recipes(args, cuda, files)
    model = recipes["mgp"].model
    batches = _default_batches(model.name, cuda, recipes)
    batches["mgp"] = args.mgp_batch or batches["mgp"]
    batches["bft"] = args.bft_batch or batches["bft"]
    stages = _split(args.stages, list(STAGES), "--stages")
    zero = _split(args.zero_stages, list(ZERO_CONFIGS), "--zero-stages")
    inputs = list(INPUTS) if args.input == "both" else [args.input]
    if args.bft_targets == "soft" and "bft" in stages and batches["bft"] % 2:
        raise SystemExit(f"bench_train: --bft-batch {batches['bft']} must be even with soft targets (timm Mixup)")
    s = Settings(
        cuda=cuda, recipe_files=files, overrides=overrides, recipes=recipes,
        stages=stages, paths=_split(args.paths, PATHS, "--paths"), inputs=inputs,
        shards=Path(args.shards) if args.shards else None,
        gen_images=args.gen_images or (2048 if cuda else 32), gen_size=_gen_size(args.gen_size, cuda),
        gen_classes=args.gen_classes or (100 if cuda else 4), workers=recipes["mgp"].data.num_workers,
        batches=batches, bft_targets=args.bft_targets, num_classes=args.num_classes,
        steps=args.steps or (30 if cuda else 3), warmup=args.warmup if args.warmup is not None else (8 if cuda else 1),
        ds_config=Path(args.ds_config or ("ds_configs/zero2_bf16.json" if cuda else "ds_configs/cpu_fp32.json")),
        ds_adam=_split(args.ds_adam, ADAM_VARIANTS, "--ds-adam") or ["config"],
        compile=args.compile, zero_stages=zero, zero_batch=args.zero_batch or batches["mgp"],
        zero_steps=args.zero_steps, peak_tflops=args.peak_tflops, seed=args.seed,
        json_out=Path(args.json_out) if args.json_out else None,
    )  # fmt: skip
    if not s.ds_config.is_absolute() and not s.ds_config.is_file():
        s.ds_config = REPO / s.ds_config
    if model.img_size % model.patch_size:
        raise SystemExit(f"bench_train: --img-size {model.img_size} is not a multiple of --patch-size "
                         f"{model.patch_size}")
    if s.steps < 1 or s.warmup < 0:
        raise SystemExit("bench_train: --steps must be >= 1 and --warmup >= 0")
    if s.shards is not None and not (s.shards / "meta.json").is_file():
        raise SystemExit(f"bench_train: --shards {s.shards}: no meta.json; make one with scripts/make_shards.py")
    return s


# ---------------------------------------------------------------------------------------------- recipes and meta
def make_recipe(s: Settings, stage: str, batch: int) -> Recipe:
    """The recipe a real run of ``stage`` would use (``s.recipe_files``), at this model size, image size and
    micro-batch, reading the (generated or given) shard set."""
    overrides = [*s.overrides, f"train.micro_batch={batch}"]
    if s.shards is not None:
        overrides.append(f"data.path={s.shards}")
    if stage == "bft" and s.bft_targets == "hard":
        overrides += ["augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0"]
    return load_recipe(s.recipe_files[stage], overrides)



def synthetic_meta(num_classes: int) -> dict[str, Any]:
    """meta.json stand-in for synthetic-only runs: an ImageNet-LT-like exponential profile 1280 -> 5."""
    counts = [max(1, int(1280 * 256 ** (-i / max(1, num_classes - 1)))) for i in range(num_classes)]
    return {"num_classes": num_classes, "class_counts": counts, "classes": [f"c{i}" for i in range(num_classes)]}



# ---------------------------------------------------------------------------------------------- runners
class Runner:
    """One model + optimizer; ``step(images, labels) -> loss`` runs a whole training step."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                 info: dict[str, Any], owned: list[Any]) -> None:
        self.step, self.device, self.info, self.owned = step, device, info, owned

    def close(self) -> None:
        for obj in self.owned:
            if hasattr(obj, "destroy"):
                with contextlib.suppress(Exception):
                    obj.destroy()
        self.owned.clear()
        self.step = None  # the closure holds the model and optimizer


def set_adam(ds: dict[str, Any], variant: str) -> dict[str, Any]:
    """Switch a resolved DeepSpeed config's AdamW implementation (see ADAM_VARIANTS); returns ``ds``."""
    params = ds["optimizer"]["params"]
    if variant == "torch-fused":
        params.update(torch_adam=True, fused=True)
    elif variant == "deepspeed-fused":
        params.pop("torch_adam", None)
        params.pop("fused", None)
    elif variant != "config":
        raise ValueError(f"--ds-adam {variant!r}: use one of {', '.join(ADAM_VARIANTS)}")
    return ds


def project_runner(s: Settings, recipe: Recipe, task: Any, ds_path: Path, *, compile_model: bool,
                   adam: str = "config") -> Runner:
    """The trainer's engine (engine.py ``build_engine``) and micro-step (engine.py ``train``) for one task."""
    from livt_ds.engine import build_engine

    ds = set_adam(resolve_ds_config(load_ds_config(ds_path), recipe, world=1), adam)
    engine, optimizer, dtype = build_engine(task, recipe, ds)
    if compile_model:
        engine.compile()
    lr = float(ds["optimizer"]["params"]["lr"])

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # the micro-step of engine.train
        apply_lr(optimizer, lr)
        images, targets = task.prepare_batch(images.to(engine.device, non_blocking=True),
                                             labels.to(engine.device, non_blocking=True))
        loss = task.loss(engine, images.to(dtype), targets)
        engine.backward(loss)
        engine.step()
        return loss

    zero = ds.get("zero_optimization", {})
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch / DeepSpeed optimizer inside ZeRO's wrapper
    info = {"ds_config": _relative(ds_path),
            "zero_stage": zero.get("stage", 0), "offload": "offload_optimizer" in zero, "ds_adam": adam,
            "optimizer": type(inner).__name__, "optimizer_fused": getattr(inner, "defaults", {}).get("fused"),
            "dtype": str(dtype).replace("torch.", ""), "param_groups": len(optimizer.param_groups),
            "prepare_batch": "device (as engine.train)", "pin_memory": torch.cuda.is_available()}
    return Runner(step, engine.device, info, [engine])


def baseline_runner(s: Settings, recipe: Recipe, task: Any, device: torch.device, *, compile_model: bool) -> Runner:
    """A plain eager loop of the same model, groups, loss and optimizer hyper-parameters (AdamW fused on CUDA)."""
    from livt_ds.seeding import seed_everything

    ds = resolve_ds_config(load_ds_config(s.ds_config), recipe, world=1)
    params = ds["optimizer"]["params"]
    seed_everything(recipe.train.seed)
    model = task.build_model().to(device)
    model.train()
    groups = param_groups(model, params.get("weight_decay", 0.0), recipe.train.layer_decay)
    lr = base_lr(recipe.train, ds["train_batch_size"])
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(params.get("betas", (0.9, 0.999))),
                            eps=params.get("eps", 1e-8), fused=cuda)
    if compile_model:
        model.compile()

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        apply_lr(opt, lr)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        images, targets = task.prepare_batch(images, labels)  # mixup on the device
        with autocast():
            loss = task.loss(model, images, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    info = {"dtype": "bf16 autocast" if cuda else "float32", "fused_adamw": cuda, "param_groups": len(groups),
            "prepare_batch": "device", "pin_memory": cuda}
    return Runner(step, device, info, [])



# ---------------------------------------------------------------------------------------------- inputs
def synthetic_batches(batch: int, img_size: int, num_classes: int, device: torch.device) -> Iterator[tuple]:
    """The same random batch on the device every step, restored in place (mixup/cutmix edit it in place)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    pristine = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    work = torch.empty_like(pristine)
    while True:
        work.copy_(pristine)
        yield work, labels


def shard_batches(s: Settings, task: Any, batch: int, num_batches: int, pin_memory: bool) -> Iterator[tuple]:
    """The trainer's ``train_loader`` stream (host tensors; the runner copies them to the device)."""
    from livt_ds.data.pipeline import StreamPosition, train_loader

    position = StreamPosition(seed=s.seed, epoch=0, rank=0, world=1, workers=s.workers, batches=num_batches)
    loader = train_loader(s.shards, position, split="train", transform=task.train_transform(), batch_size=batch,
                          pin_memory=pin_memory)
    yield from loader


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runner: Runner, batches: Iterator[tuple], warmup: int, steps: int) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` steps; synchronised wall time of the timed steps, peak memory, last loss."""
    device = runner.device
    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    mem_start = torch.cuda.memory_allocated(device) if cuda else None
    loss = None
    for _ in range(warmup):
        loss = runner.step(*next(batches))
    _sync(device)
    wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        loss = runner.step(*batch)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "data_wait_s": wait, "loss": float(loss.detach().float().cpu()),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
            "mem_start_gib": mem_start / GIB if cuda else None}


def summarise(raw: dict[str, Any], batch: int, steps: int, flops: dict[str, int], peak: float,
              cuda: bool) -> dict[str, Any]:
    """images/s, ms/step, host wait for data, model TFLOP/s (layers only, and with embeddings/heads), share."""
    ips = batch * steps / raw["elapsed_s"]
    tflops = ips * flops["train"] / 1e12
    return {
        "images_per_s": round(ips, 2), "step_ms": round(1000 * raw["elapsed_s"] / steps, 3),
        "data_wait_ms": round(1000 * raw["data_wait_s"] / steps, 3),
        "model_tflops": round(tflops, 3),
        "model_tflops_with_embed_heads": round(ips * flops["train_with_extras"] / 1e12, 3),
        "share_of_peak": round(tflops / peak, 4) if cuda else None,
        "peak_mem_gib": None if raw["peak_mem_gib"] is None else round(raw["peak_mem_gib"], 3),
        "mem_start_gib": None if raw["mem_start_gib"] is None else round(raw["mem_start_gib"], 3),
        "loss": raw["loss"], "loss_finite": math.isfinite(raw["loss"]),
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _error(exn: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"{type(exn).__name__}: {exn}"[:2000]



# ---------------------------------------------------------------------------------------------- the matrix
@dataclass
class Context:
    settings: Settings
    device: torch.device
    meta: dict[str, Any]
    flops: dict[str, dict[str, int]]


def _build_runner(ctx: Context, path: str, adam: str | None, recipe: Recipe, task: Any) -> Runner:
    s = ctx.settings
    if path == "project":
        return project_runner(s, recipe, task, s.ds_config, compile_model=s.compile, adam=adam or "config")
    return baseline_runner(s, recipe, task, ctx.device, compile_model=s.compile)


def _path_runs(s: Settings) -> list[tuple[str, str | None]]:
    """(path, --ds-adam variant) pairs: one project run per variant, then the baseline."""
    runs: list[tuple[str, str | None]] = [("project", v) for v in s.ds_adam] if "project" in s.paths else []
    return runs + ([("baseline", None)] if "baseline" in s.paths else [])


def _batches_for(ctx: Context, runner: Runner, path: str, task: Any, stage: str, mode: str) -> tuple[Iterator, int]:
    """(batch iterator, warm-up steps) for one input mode."""
    s = ctx.settings
    batch = s.batches[stage]
    if mode == "synthetic":
        return synthetic_batches(batch, s.model.img_size, ctx.meta["num_classes"], runner.device), s.warmup
    warmup = s.warmup + 2 * s.workers
    return shard_batches(s, task, batch, warmup + s.steps, ctx.device.type == "cuda"), warmup


def run_stage(ctx: Context, stage: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """All (path, input) runs of one stage; one model/engine per path, shared by the input modes."""
    from livt_ds.tasks import build_task

    s = ctx.settings
    batch = s.batches[stage]
    recipe = make_recipe(s, stage, batch)
    task = build_task(STAGES[stage], recipe, ctx.meta)
    entries = []
    for path, adam in _path_runs(s):
        base = {"stage": stage, "path": path, "ds_adam": adam, "batch": batch, "compiled": s.compile}
        try:
            log(f"{stage}/{path}{f' ({adam})' if adam else ''}: building {s.model.name} at {s.model.img_size} px, "
                f"micro-batch {batch}")
            runner = _build_runner(ctx, path, adam, recipe, task)
        except Exception as exn:  # noqa: BLE001 - recorded, the other runs go on
            entries += [{**base, "input": mode, "error": _error(exn)} for mode in s.inputs]
            free_memory(ctx.device)
            continue
        for mode in s.inputs:
            entry = {**base, "input": mode, **runner.info}
            try:
                batches, warmup = _batches_for(ctx, runner, path, task, stage, mode)
                raw = measure(runner, batches, warmup, s.steps)
                batches.close()
                cuda = ctx.device.type == "cuda"
                entry.update(warmup=warmup, steps=s.steps,
                             **summarise(raw, batch, s.steps, ctx.flops[stage], s.peak_tflops, cuda))
                log(f"{stage}/{path}/{mode}: {entry['images_per_s']:.1f} images/s, {entry['step_ms']:.1f} ms/step, "
                    f"loss {entry['loss']:.4g}")
            except Exception as exn:  # noqa: BLE001
                entry["error"] = _error(exn)
            entries.append(entry)
            free_memory(ctx.device)
        runner.close()
        del runner
        free_memory(ctx.device)
    return entries


def add_ratios(entries: list[dict[str, Any]]) -> None:
    """``ratio_project_over_baseline`` (images/s) per (stage, input): a project entry's own images/s over the
    baseline's; on the baseline entry, the first project variant's. None when either run failed."""
    baseline = {(e["stage"], e["input"]): e.get("images_per_s") for e in entries if e["path"] == "baseline"}
    first: dict[tuple, float | None] = {}
    for e in entries:
        if e["path"] == "project":
            first.setdefault((e["stage"], e["input"]), e.get("images_per_s"))
    for e in entries:
        key = (e["stage"], e["input"])
        p = e.get("images_per_s") if e["path"] == "project" else first.get(key)
        b = baseline.get(key)
        e["ratio_project_over_baseline"] = round(p / b, 4) if p and b else None


def zero_sweep(ctx: Context, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Peak GPU memory and images/s of the MGP model under each requested ZeRO config, synthetic input."""
    from livt_ds.tasks import build_task

    s = ctx.settings
    recipe = make_recipe(s, "mgp", s.zero_batch)
    task = build_task(STAGES["mgp"], recipe, ctx.meta)
    flops = ctx.flops["mgp"]
    out = []
    # DeepSpeed 0.19.8 keeps a ZeRO-3 engine alive after destroy() (its parameter hooks hold the module), so its
    # memory would count against the configs after it: stage 3 runs last. Stages 1, 2 and 2offload are freed.
    for key in sorted(s.zero_stages, key=lambda k: k == "3"):
        entry: dict[str, Any] = {"zero": key, "ds_config": ZERO_CONFIGS[key], "stage": "mgp", "batch": s.zero_batch}
        try:
            log(f"zero sweep: {key} ({ZERO_CONFIGS[key]})")
            runner = project_runner(s, recipe, task, REPO / ZERO_CONFIGS[key], compile_model=False)
            try:
                batches = synthetic_batches(s.zero_batch, s.model.img_size, ctx.meta["num_classes"], runner.device)
                raw = measure(runner, batches, min(2, s.warmup), s.zero_steps)
                entry.update(summarise(raw, s.zero_batch, s.zero_steps, flops, s.peak_tflops, True))
            finally:
                runner.close()
                del runner
        except Exception as exn:  # noqa: BLE001
            entry["error"] = _error(exn)
        free_memory(ctx.device)
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------- report
def table(entries: list[dict[str, Any]], zero: list[dict[str, Any]] | None) -> str:
    head = f"{'stage':5} {'path':24} {'input':9} {'batch':>5} {'img/s':>9} {'ms/step':>8} {'wait ms':>8} " \
           f"{'TFLOP/s':>8} {'%peak':>6} {'mem GiB':>8} {'ratio':>6}"
    lines = [head, "-" * len(head)]

    def fmt(v: Any, spec: str) -> str:
        width = int(spec.split(".")[0] or 0)
        return "-".rjust(width) if v is None else format(v, spec)

    for e in entries:
        path = e["path"] if not e.get("ds_adam") or e["ds_adam"] == "config" else f"{e['path']}/{e['ds_adam']}"
        if "error" in e:
            lines.append(f"{e['stage']:5} {path:24} {e['input']:9} ERROR {e['error'][:80]}")
            continue
        share = None if e["share_of_peak"] is None else 100 * e["share_of_peak"]
        lines.append(f"{e['stage']:5} {path:24} {e['input']:9} {e['batch']:>5} {e['images_per_s']:>9.1f} "
                     f"{e['step_ms']:>8.1f} {e['data_wait_ms']:>8.1f} {e['model_tflops']:>8.2f} {fmt(share, '6.1f')} "
                     f"{fmt(e['peak_mem_gib'], '8.2f')} {fmt(e['ratio_project_over_baseline'], '6.3f')}")
    for z in zero or []:
        if "error" in z:
            lines.append(f"zero {z['zero']:9} ERROR {z['error'][:80]}")
        else:
            lines.append(f"zero {z['zero']:9} batch {z['batch']}: peak {fmt(z['peak_mem_gib'], '.2f')} GiB, "
                         f"{z['images_per_s']:.1f} images/s")
    return "\n".join(lines)


def _relative(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def _versions() -> dict[str, str]:
    import deepspeed
    import timm

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda or "", "python": sys.version.split()[0]}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def choose_device(choice: str) -> bool:
    """True for CUDA. Must run before deepspeed is imported: DS_ACCELERATOR decides its accelerator, and
    DeepSpeed's op builders (FusedAdam) cannot parse the "9.0a" torch reports on Hopper, so on CUDA
    TORCH_CUDA_ARCH_LIST defaults to the device's compute capability, e.g. "9.0"."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    if choice == "cuda" and os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        raise SystemExit(f"bench_train: --device cuda but DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}; unset it")
    forced_cpu = choice == "auto" and os.environ.get("DS_ACCELERATOR") == "cpu"  # DeepSpeed would run on CPU anyway
    cuda = choice != "cpu" and not forced_cpu and torch.cuda.is_available()
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*torch.cuda.get_device_capability()))
    return cuda


def run(s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Everything: optional shard generation, the (stage, path, input) matrix, the ZeRO sweep; the JSON document."""
    from livt_ds import dist
    from livt_ds.data.shards import load_meta

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
        flops = {st: flops_per_image(st, s.recipes[st].model, num_classes=meta["num_classes"]) for st in STAGES}
        ctx = Context(s, device, meta, flops)
        if load_ds_config(s.ds_config).get("zero_optimization", {}).get("stage") == 3:
            s.notes.append("ZeRO-3 engines are not freed in-process by DeepSpeed 0.19.8: the memory of earlier "
                           "ZeRO-3 runs shows in mem_start_gib / peak_mem_gib of the later ones")
        entries = [e for stage in s.stages for e in run_stage(ctx, stage, log)]
        add_ratios(entries)
        if s.zero_stages and not s.cuda:
            zero: Any = {"skipped": "the ZeRO memory sweep needs a GPU (peak memory is torch.cuda's); run it with CUDA"}
            log(zero["skipped"])
        else:
            zero = zero_sweep(ctx, log) if s.zero_stages else None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "settings": {
            "device": _device_name(device), "model": s.model.name, "img_size": s.model.img_size,
            "patch_size": s.model.patch_size,
            "decoder": {"dim": s.model.decoder_dim, "depth": s.model.decoder_depth, "heads": s.model.decoder_heads},
            "mask_ratio": s.model.mask_ratio,
            "recipes": {st: _relative(path) for st, path in s.recipe_files.items()}, "recipe_overrides": s.overrides,
            "batches": s.batches, "steps": s.steps, "warmup": s.warmup, "workers": s.workers,
            "ds_config": str(s.ds_config), "compile": s.compile, "bft_targets": s.bft_targets,
            "num_classes": meta["num_classes"], "shards": str(s.shards) if s.shards and tmp is None else None,
            "peak_tflops": s.peak_tflops, "versions": _versions(), "command": sys.argv,
        },
        "flops_per_image": flops,
        "flops_formula": FORMULA,
        "fields": FIELDS,
        "notes": s.notes,
        "results": entries,
        "zero_stages": zero,
        "wall_s": round(time.time() - t0, 1),
    }




def failed(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a ``run`` document that recorded an error (the matrix and the ZeRO sweep)."""
    bad = [e for e in doc["results"] if "error" in e]
    return bad + [z for z in doc["zero_stages"] or [] if isinstance(z, dict) and "error" in z]
