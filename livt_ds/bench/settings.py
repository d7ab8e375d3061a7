"""What a benchmark runs: the caller's options resolved against the shipped recipes and the device.

Recipes: on a GPU the ImageNet-LT recipes of the model (``configs/{mgp,bft}_{model}_imagenet_lt.yaml``, named
after the methods of the stages pretrain and finetune; sizes without recipes of their own take the ViT-L ones with
``model.name`` replaced), on the CPU the tiny recipes. The
benchmark keeps everything they set (model, mask ratio, decoder, drop path, augmentation, loss, learning rate,
betas, layer decay, micro-batch) except two things, so that every timed step is a whole optimizer step from
scratch: weights are not loaded (``model.init=``) and there is no gradient accumulation (``train.batch_size=null``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from livt_ds.config import ModelConfig, Recipe, load_recipe
from livt_ds.cuda_arch import set_plain_cuda_arch_list
from livt_ds.errors import ConfigError
from livt_ds.models.registry import MODEL_SIZES
from livt_ds.recipes import find, shipped_dir
from livt_ds.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
STAGES = tuple(TASKS)  # the trainer's stages: pretrain, finetune
RECIPE_PREFIX = {"pretrain": "mgp", "finetune": "bft"}  # the shipped recipes are named after the methods
PATHS = ("project", "baseline")
INPUTS = ("synthetic", "shards")
# project: the DeepSpeed config's optimizer block as written (the shipped ones: torch's foreach AdamW); torch's AdamW
# with fused=True through DeepSpeed's torch_adam path; DeepSpeed's JIT-built FusedAdam.
ADAM_VARIANTS = ("config", "torch-fused", "deepspeed-fused")
# baseline: fp32 weights under bf16 autocast with fused AdamW (the reference figures' loop); the weights in the
# engine's dtype (bf16 with a bf16 config) with foreach AdamW, what the engine computes, without the engine.
EAGER_VARIANTS = ("amp-fused", "pure-foreach")
LIKE_FOR_LIKE = "pure-foreach"  # the eager variant the engine's ratio is taken against
ZERO_CONFIGS = {
    "1": "zero1_bf16.json",
    "2": "zero2_bf16.json",
    "3": "zero3_bf16.json",
    "2offload": "zero2_offload_bf16.json",
}
BENCH_OVERRIDES = ("model.init=", "train.batch_size=null")


@dataclass
class BenchOptions:
    """What the caller asks for; None means the default for the device (see ``resolve_settings``)."""

    model: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    decoder: tuple[int, int, int] | None = None  # the MAE decoder of pretraining (dim, depth, heads)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    paths: list[str] = field(default_factory=lambda: list(PATHS))
    inputs: list[str] = field(default_factory=lambda: list(INPUTS))
    shards: Path | None = None
    gen_images: int | None = None
    gen_size: tuple[int, int] | None = None
    gen_classes: int | None = None
    workers: int | None = None
    pretrain_batch: int | None = None
    finetune_batch: int | None = None
    finetune_targets: str = "soft"
    num_classes: int = 1000
    steps: int | None = None
    warmup: int | None = None
    ds_config: Path | None = None
    ds_adam: list[str] = field(default_factory=lambda: ["config"])
    eager: list[str] = field(default_factory=lambda: list(EAGER_VARIANTS))
    compile: bool = False
    zero_stages: list[str] = field(default_factory=list)
    zero_batch: int | None = None
    zero_steps: int = 5
    peak_tflops: float = PEAK_TFLOPS
    seed: int = 0


@dataclass
class Settings:
    """The resolved benchmark: every default filled for the device, the recipes loaded."""

    cuda: bool
    recipe_files: dict[str, Path]  # stage -> configs/*.yaml
    overrides: list[str]  # applied to both recipes: BENCH_OVERRIDES, model name and sizes, decoder, workers, seed
    recipes: dict[str, Recipe]  # stage -> its recipe with ``overrides``
    stages: list[str]
    paths: list[str]
    inputs: list[str]
    shards: Path | None
    gen_images: int
    gen_size: tuple[int, int]
    gen_classes: int
    workers: int
    batches: dict[str, int]
    finetune_targets: str
    num_classes: int
    steps: int
    warmup: int
    ds_config: Path
    ds_adam: list[str]
    eager: list[str]
    compile: bool
    zero_stages: list[str]
    zero_batch: int
    zero_steps: int
    peak_tflops: float
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> ModelConfig:
        """The model of the pretraining recipe (name, sizes, mask ratio, decoder); fine-tuning's has the same name and
        sizes."""
        return self.recipes["pretrain"].model


def choose_device(choice: str) -> bool:
    """True for CUDA. Call it before deepspeed is imported: DS_ACCELERATOR decides DeepSpeed's accelerator (set to
    "cpu" here when the CPU is chosen), and on CUDA ``TORCH_CUDA_ARCH_LIST`` gets the device's plain capability."""
    if choice not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device {choice!r}: use auto, cuda or cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: torch sees no GPU (torch.cuda.is_available() is False); use cpu")
    if choice == "cuda" and os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        raise ConfigError(f"device cuda: DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} would run DeepSpeed "
                          "elsewhere; unset it")
    forced_cpu = choice == "auto" and os.environ.get("DS_ACCELERATOR") == "cpu"
    cuda = choice != "cpu" and not forced_cpu and torch.cuda.is_available()
    if cuda:
        set_plain_cuda_arch_list()
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"
    return cuda


def recipe_files(model: str | None, cuda: bool) -> dict[str, Path]:
    """stage -> the recipe a real run of ``model`` uses: its ImageNet-LT recipes on a GPU, the tiny ones on a CPU."""
    if not cuda:
        return {stage: shipped_dir("recipe") / f"tiny_{RECIPE_PREFIX[stage]}.yaml" for stage in STAGES}
    own = {stage: shipped_dir("recipe") / f"{RECIPE_PREFIX[stage]}_{model}_imagenet_lt.yaml" for stage in STAGES}
    if model is not None and all(path.is_file() for path in own.values()):
        return own
    return {stage: shipped_dir("recipe") / f"{RECIPE_PREFIX[stage]}_vit_large_imagenet_lt.yaml" for stage in STAGES}


def check_names(given: list[str], valid: tuple[str, ...] | list[str], what: str) -> list[str]:
    """``given`` when every name is one of ``valid``; raises ConfigError naming the unknown ones."""
    bad = [name for name in given if name not in valid]
    if bad:
        raise ConfigError(f"{what} {bad} unknown; valid: {', '.join(valid)}")
    return list(given)


def _load_recipes(o: BenchOptions, files: dict[str, Path], cuda: bool) -> tuple[list[str], dict[str, Recipe], int]:
    """(overrides for both stages, stage -> recipe, loader workers): the options' model, sizes and decoder, else the
    pretraining recipe's, for both stages."""
    decoder = [] if o.decoder is None else [f"model.decoder_{key}={value}"
                                            for key, value in zip(("dim", "depth", "heads"), o.decoder, strict=True)]
    given = [f"model.{key}={value}" for key, value in (("name", o.model), ("img_size", o.img_size),
                                                       ("patch_size", o.patch_size)) if value]
    pretrain = load_recipe(files["pretrain"], [*BENCH_OVERRIDES, *given, *decoder])
    cores = os.cpu_count() or 2
    default_workers = max(1, min(14, cores - 2)) if cuda else pretrain.data.num_workers
    workers = o.workers if o.workers is not None else default_workers
    m = pretrain.model
    overrides = [*BENCH_OVERRIDES, f"model.name={m.name}", f"model.img_size={m.img_size}",
                 f"model.patch_size={m.patch_size}", *decoder, f"data.num_workers={workers}", f"train.seed={o.seed}"]
    return overrides, {stage: load_recipe(path, overrides) for stage, path in files.items()}, workers


def resolve_settings(o: BenchOptions, cuda: bool) -> Settings:
    """Load the recipes and fill the device's defaults; raises ConfigError on a combination that cannot run."""
    if o.model is not None and o.model not in MODEL_SIZES:
        raise ConfigError(f"model {o.model!r} unknown; valid: {', '.join(MODEL_SIZES)}")
    stages = check_names(o.stages, STAGES, "stages")
    files = recipe_files(o.model, cuda)
    overrides, recipes, workers = _load_recipes(o, files, cuda)
    batches = {stage: given or recipes[stage].train.micro_batch
               for stage, given in (("pretrain", o.pretrain_batch), ("finetune", o.finetune_batch))}
    unset = [stage for stage, batch in batches.items() if not batch]
    if unset:
        raise ConfigError(f"the recipes {[str(files[s]) for s in unset]} set no train.micro_batch; give the "
                          f"{' and '.join(s + ' batch' for s in unset)}")
    model = recipes["pretrain"].model
    if model.img_size % model.patch_size:
        raise ConfigError(f"img_size {model.img_size} is not a multiple of patch_size {model.patch_size}")
    if o.finetune_targets not in ("soft", "hard"):
        raise ConfigError(f"finetune_targets {o.finetune_targets!r}: use soft or hard")
    if o.finetune_targets == "soft" and "finetune" in stages and batches["finetune"] % 2:
        raise ConfigError(f"finetune micro-batch {batches['finetune']} must be even with soft targets (timm Mixup "
                          "pairs images); use an even batch or hard targets")
    steps = o.steps if o.steps is not None else (30 if cuda else 3)
    warmup = o.warmup if o.warmup is not None else (8 if cuda else 1)
    if steps < 1 or warmup < 0:
        raise ConfigError(f"steps {steps} must be >= 1 and warmup {warmup} >= 0")
    if o.shards is not None and not (Path(o.shards) / "meta.json").is_file():
        raise ConfigError(f"shards {o.shards}: no meta.json; make a shard set with scripts/make_shards.py")
    ds_config = find("ds_config", o.ds_config or ("zero2_bf16.json" if cuda else "cpu_fp32.json"))
    return Settings(
        cuda=cuda, recipe_files=files, overrides=overrides, recipes=recipes, stages=stages,
        paths=check_names(o.paths, PATHS, "paths"), inputs=check_names(o.inputs, INPUTS, "inputs"),
        shards=Path(o.shards) if o.shards else None, gen_images=o.gen_images or (2048 if cuda else 32),
        gen_size=o.gen_size or ((500, 375) if cuda else (40, 36)), gen_classes=o.gen_classes or (100 if cuda else 4),
        workers=workers, batches=batches, finetune_targets=o.finetune_targets, num_classes=o.num_classes, steps=steps,
        warmup=warmup, ds_config=ds_config, ds_adam=check_names(o.ds_adam, ADAM_VARIANTS, "ds_adam") or ["config"],
        eager=check_names(o.eager, EAGER_VARIANTS, "eager") or [LIKE_FOR_LIKE], compile=o.compile,
        zero_stages=check_names(o.zero_stages, list(ZERO_CONFIGS), "zero_stages"),
        zero_batch=o.zero_batch or batches["pretrain"], zero_steps=o.zero_steps, peak_tflops=o.peak_tflops, seed=o.seed,
    )


def make_recipe(s: Settings, stage: str, batch: int) -> Recipe:
    """The recipe a real run of ``stage`` would use (``s.recipe_files``), at this model size, image size and
    micro-batch, reading the (generated or given) shard set."""
    overrides = [*s.overrides, f"train.micro_batch={batch}"]
    if s.shards is not None:
        overrides.append(f"data.path={s.shards}")
    if stage == "finetune" and s.finetune_targets == "hard":
        overrides += ["augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0"]
    return load_recipe(s.recipe_files[stage], overrides)


def synthetic_meta(num_classes: int) -> dict[str, Any]:
    """meta.json stand-in for synthetic-only runs: an ImageNet-LT-like exponential profile 1280 -> 5."""
    counts = [max(1, int(1280 * 256 ** (-i / max(1, num_classes - 1)))) for i in range(num_classes)]
    return {"num_classes": num_classes, "class_counts": counts, "classes": [f"c{i}" for i in range(num_classes)]}
