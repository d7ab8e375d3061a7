"""Recipes (YAML) as typed, frozen dataclasses, and their merge with a DeepSpeed JSON config.

The recipe owns the experiment (model, data, epochs, base lr, schedule, loss, augmentation); the DeepSpeed
JSON owns parallelism and the optimizer. Values the trainer derives may be written ``"auto"`` in the JSON;
an explicit value that contradicts the recipe is an error, never silently overridden.

A recipe may name a base recipe (``base: mgp_vit_base_imagenet_lt.yaml``, relative to its folder) and hold only
its differences; the loaded Recipe is always whole (no ``base``), and it is what a run saves as ``config.yaml``.
The defaults of the recipe values live in the dataclasses below; model builders, transforms and remote reads take
them from the typed recipe instead of repeating them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or DeepSpeed config that cannot be used as written."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vit_base"
    img_size: int = 224
    patch_size: int = 16
    init: str = ""  # BFT / eval: an MGP or BFT run folder, a checkpoint folder, or an exported .pt file
    drop_path: float = 0.1
    global_pool: str = "avg"  # "avg" (mean of patch tokens + LayerNorm) or "token" (cls token)
    mask_ratio: float = 0.75
    norm_pix: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a shard set folder made by scripts/make_shards.py, or its URL (http(s)://, s3://, gs://, pipe:)
    train_split: str = "train"
    eval_split: str = "val"  # evaluations during training, and the choice of the best checkpoint, read this split
    test_split: str | None = "auto"  # read once at the end of BFT; auto: meta.json's test split; null: none
    num_workers: int = 4
    mean: list[float] | None = None  # None: meta.json's measured mean, else ImageNet's
    std: list[float] | None = None
    retries: int = 5  # URLs: further tries of a shard whose read failed (then it is skipped and counted)
    retry_backoff_s: float = 1.0  # URLs: wait before the first retry, doubling after each
    timeout_s: float = 60.0  # URLs: connect / read timeout of one HTTP request
    cache_dir: str = ""  # URLs: keep downloaded shards here so later epochs read the disk ("" = no cache)
    cache_max_gb: float = 100.0  # URLs: size bound of cache_dir (least recently used shards are evicted)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int | None = None  # effective (global) batch; None: micro * accumulation * world from the JSON
    micro_batch: int | None = None  # fills "auto" micro-batch size in the JSON
    blr: float = 1e-3
    lr: float | None = None  # absolute lr; overrides blr * batch_size / 256
    min_lr: float = 0.0
    warmup_epochs: float = 5.0
    layer_decay: float = 1.0  # BFT: 0.75 (BEiT-style layer-wise lr decay); 1.0 disables it
    steps_per_epoch: int | None = None  # None: num_samples // batch_size
    stop_after_steps: int | None = None  # stop (with a checkpoint) at this optimizer step; the schedule is unchanged
    seed: int = 0
    betas: list[float] | None = None  # AdamW betas; fills "betas": "auto" in the DeepSpeed JSON (MGP and BFT differ)


@dataclass(frozen=True)
class LossConfig:
    name: str = "bal_bce"  # ce | bal_ce | bce | bal_bce | focal | cb_ce | cb_focal | ldam (livt_ds/losses.py)
    tau: float = 1.0  # bal_ce, bal_bce: scale of the logit bias
    test_prior: list[float] | None = None  # bal_ce, bal_bce: None = uniform (balanced test set)
    gamma: float = 2.0  # focal, cb_focal: the focusing exponent
    beta: float = 0.9999  # cb_ce, cb_focal, ldam's DRW: class-balanced weights (1 - beta) / (1 - beta^n_c)
    max_margin: float = 0.5  # ldam: the rarest class's margin
    scale: float = 30.0  # ldam: s in cross_entropy(s * (z - m_y onehot(y)), y)
    drw_epoch: int | None = None  # ldam: re-weight from this (0-based) epoch on; None = 80 % of train.epochs

    def __post_init__(self) -> None:
        from livt_ds.losses import LOSS_NAMES

        if self.name not in LOSS_NAMES:
            raise ConfigError(f"loss.name={self.name!r} is unknown; valid names: {', '.join(LOSS_NAMES)}")
        checks = (("gamma", self.gamma >= 0, ">= 0 (0 is cross-entropy)"), ("beta", 0 <= self.beta < 1, "in [0, 1)"),
                  ("max_margin", self.max_margin > 0, "> 0"), ("scale", self.scale > 0, "> 0"),
                  ("drw_epoch", self.drw_epoch is None or self.drw_epoch >= 0, ">= 0 (or null for 80 % of epochs)"))
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"loss.{key}={getattr(self, key)}: must be {rule}")


@dataclass(frozen=True)
class AugmentConfig:
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    crop_pct: float | None = None  # eval resize = img_size / crop_pct; None: 0.875 up to 224 px, 1.0 above
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # BFT RandomResizedCrop area range (timm)

    def __post_init__(self) -> None:
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"augment.crop_scale: expected [min, max] area fractions with 0 < min <= max <= 1, "
                              f"got {lo_hi!r} (timm's default is [0.08, 1.0])")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # evaluate every N epochs (and always at the end); 0: only at the end
    batch_size: int = 64
    # extra test priors for the test-prior table, besides uniform and forward/backward-{2,5,10,25,50}:
    # "forward-R", "backward-R" or a JSON file {"class name": weight}
    test_priors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000  # also saved at the end, at stop_after_steps and on SIGTERM
    keep_last: int = 2


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 20
    tensorboard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------------------------------------- recipe I/O


def check_loss_targets(recipe: Recipe) -> None:
    """Refuse a loss that needs hard labels together with augmentations that make soft targets."""
    from livt_ds.losses import HARD_LABEL_LOSSES

    a = recipe.augment
    soft = {k: v for k, v in (("mixup", a.mixup), ("cutmix", a.cutmix), ("label_smoothing", a.label_smoothing)) if v}
    if recipe.loss.name in HARD_LABEL_LOSSES and soft:
        raise ConfigError(f"loss.name={recipe.loss.name} needs hard labels (its margin belongs to one true class), "
                          f"but augment makes soft targets ({', '.join(f'{k}={v}' for k, v in soft.items())}); "
                          "set " + " ".join(f"augment.{k}=0" for k in soft))


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Validate ``value`` against a type hint, returning it coerced (int -> float, list -> list of floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_hint_name(hint)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {_hint_name(hint)}, got {value!r} ({type(value).__name__})")
    return value


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = _field_names(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in valid:
            where = f" in {prefix[:-1]}" if prefix else ""
            raise ConfigError(f"unknown key '{dotted}'; valid keys{where}: {', '.join(valid)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{dotted}.")
        else:
            kwargs[key] = _check_value(dotted, value, hint)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=2`` -> ("train.epochs", 2); the value is read as YAML (numbers, null, lists, strings)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return key.strip(), value


BASE_KEY = "base"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections (model, data, train, ...)")
    return tree


def merge_trees(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key (deep); lists and scalars replace.

    A section left empty in the child (``model:`` with nothing under it) changes nothing.
    """
    merged = copy.deepcopy(base)
    for key, value in child.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = merge_trees(old, value)
        elif isinstance(old, dict) and value is None:
            continue
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_recipe_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe file's tree merged over its ``base:`` chain (``base`` is relative to the file's folder).

    Each file is checked on its own first, so an unknown key or a wrong type names the file that holds it.
    The result has no ``base`` key: it is the whole recipe.
    """
    path = Path(path)
    if not path.is_file():
        if _chain:
            raise ConfigError(f"{_chain[-1]}: base recipe {path} not found (base: is relative to the recipe's folder)")
        raise ConfigError(f"{path}: recipe not found (see configs/ for the shipped recipes)")
    if any(path.resolve() == seen.resolve() for seen in _chain):
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"recipe base cycle: {cycle}; a recipe may not name itself as a base, even indirectly")
    tree = _read_yaml(path)
    base = tree.pop(BASE_KEY, None)
    try:
        _build(Recipe, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the file name of a recipe (e.g. mgp_vit_base_imagenet_lt.yaml), "
                          f"got {base!r}")
    return merge_trees(read_recipe_tree(path.parent / base, (*_chain, path)), tree)


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (merged over its ``base:`` chain; defaults when ``path`` is None), then apply dotted
    overrides."""
    tree: dict[str, Any] = {} if path is None else read_recipe_tree(path)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        recipe = _build(Recipe, tree, "")
        check_loss_targets(recipe)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    return _build(Recipe, data, "")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


# ---------------------------------------------------------------------------------------------- DeepSpeed JSON

AUTO = "auto"


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found (see ds_configs/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc


def _explicit(value: Any) -> bool:
    return value is not None and value != AUTO


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's batch is made: micro * accumulation * world == global."""

    micro: int
    accumulation: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world


def largest_micro(batch: int, world: int, ceiling: int) -> int | None:
    """The largest micro-batch m <= ``ceiling`` with m x accumulation x ``world`` == ``batch`` for a whole
    accumulation; None when ``batch`` is not a multiple of ``world``."""
    if batch % world:
        return None
    per_rank = batch // world
    return next((m for m in range(min(ceiling, per_rank), 0, -1) if per_rank % m == 0), None)


def nearest_batches(batch: int, world: int, unit: int = 1) -> list[int]:
    """The batch sizes closest to ``batch`` (one below, one above) that split over ``world`` ranks in whole
    micro-batches: the multiples of ``world * unit``."""
    step = world * unit
    below, above = batch // step * step, -(-batch // step) * step
    return sorted({b for b in (below, above) if b > 0})


def _no_layout(batch: int, world: int, step_unit: int, train: TrainConfig, why: str) -> ConfigError:
    options = " or ".join(f"train.batch_size={b} (lr {base_lr(train, b):.3g})"
                          for b in nearest_batches(batch, world, step_unit))
    return ConfigError(f"train.batch_size={batch} cannot be split over {world} ranks: {why}. Nearest batch sizes "
                       f"that work: {options} (lr = train.blr {train.blr:g} x batch / 256"
                       + (f"; train.lr={train.lr:g} is fixed" if train.lr is not None else "") + ")")


def plan_batch(ds: dict[str, Any], train: TrainConfig, world: int) -> BatchPlan:
    """Fill the batch triple from the recipe and the JSON, refusing contradictions.

    ``train.micro_batch`` is a per-rank ceiling (what fits in one GPU's memory): with a fixed ``train.batch_size``
    the largest micro-batch at or under it that makes micro x accumulation x world == batch is chosen, so a recipe
    starts unchanged on any world size that divides its batch. A micro-batch written in the JSON is taken as is.
    """
    micro = ds.get("train_micro_batch_size_per_gpu", AUTO)
    accum = ds.get("gradient_accumulation_steps", AUTO)
    total = ds.get("train_batch_size", AUTO)
    fixed_micro = _explicit(micro)
    if not fixed_micro:
        micro = train.micro_batch
        if micro is None:
            raise ConfigError("train_micro_batch_size_per_gpu is 'auto' in the DeepSpeed config: set train.micro_batch "
                              "in the recipe or a number in the JSON")
    elif train.micro_batch is not None and train.micro_batch != micro:
        raise ConfigError(f"train.micro_batch={train.micro_batch} contradicts train_micro_batch_size_per_gpu={micro} "
                          "in the DeepSpeed config; set one of them (or 'auto' in the JSON)")
    batch = train.batch_size
    if batch is None and _explicit(total):
        batch = int(total)
    if _explicit(total) and batch != total:
        raise ConfigError(f"train.batch_size={batch} contradicts train_batch_size={total} in the DeepSpeed config")
    if batch is not None and not _explicit(accum):
        if fixed_micro:
            if batch % (micro * world):
                raise _no_layout(batch, world, int(micro), train, f"it is not a multiple of the DeepSpeed config's "
                                 f"train_micro_batch_size_per_gpu {micro} x {world} ranks")
        else:
            chosen = largest_micro(batch, world, int(micro))
            if chosen is None:
                why = "it is smaller than the world size" if batch < world else "it is not a multiple of the world size"
                raise _no_layout(batch, world, 1, train, why)
            micro = chosen
        accum = batch // (micro * world)
    elif batch is not None and not fixed_micro:  # accumulation fixed in the JSON: the micro-batch follows
        per_micro = batch / (int(accum) * world)
        if per_micro != int(per_micro) or not 1 <= per_micro <= micro:
            raise _no_layout(batch, world, int(accum), train, f"the DeepSpeed config fixes gradient_accumulation_steps"
                             f" {accum}, which needs a micro-batch of {per_micro:g} (train.micro_batch allows at most "
                             f"{micro})")
        micro = int(per_micro)
    elif not _explicit(accum):
        accum = 1
    plan = BatchPlan(int(micro), int(accum), world)
    if batch is not None and plan.global_batch != batch:
        raise ConfigError(f"train_batch_size {batch} != micro {micro} x gradient_accumulation_steps {accum} x world "
                          f"{world} = {plan.global_batch}; fix the recipe's train.batch_size or the DeepSpeed config")
    return plan


def base_lr(train: TrainConfig, global_batch: int) -> float:
    """lr = blr * effective_batch / 256 (the linear scaling rule), unless train.lr is given."""
    return train.lr if train.lr is not None else train.blr * global_batch / 256


def _resolve_betas(given: Any, recipe_betas: list[float] | None) -> list[float]:
    """The JSON's betas, or the recipe's where the JSON says "auto"; both given and different is an error."""
    if recipe_betas is not None and len(recipe_betas) != 2:
        raise ConfigError(f"train.betas={recipe_betas}: expected two numbers [beta1, beta2]")
    if not _explicit(given):
        if recipe_betas is None:
            raise ConfigError('optimizer.params.betas is "auto" in the DeepSpeed config: set train.betas in the recipe '
                              "(the paper: [0.9, 0.95]) or give the numbers in the JSON")
        return [float(b) for b in recipe_betas]
    given = [float(b) for b in given]
    if recipe_betas is not None and given != [float(b) for b in recipe_betas]:
        raise ConfigError(f"optimizer.params.betas={given} in the DeepSpeed config contradicts train.betas="
                          f"{list(recipe_betas)} in the recipe; write \"auto\" in the JSON")
    return given


def resolve_ds_config(ds: dict[str, Any], recipe: Recipe, world: int) -> dict[str, Any]:
    """Return a complete DeepSpeed config: "auto" filled from the recipe, contradictions refused."""
    ds = copy.deepcopy(ds)
    if "scheduler" in ds:
        raise ConfigError("the DeepSpeed config has a 'scheduler' block, but the recipe owns the schedule "
                          "(train.warmup_epochs, train.min_lr): remove it")
    plan = plan_batch(ds, recipe.train, world)
    ds["train_micro_batch_size_per_gpu"] = plan.micro
    ds["gradient_accumulation_steps"] = plan.accumulation
    ds["train_batch_size"] = plan.global_batch
    lr = base_lr(recipe.train, plan.global_batch)
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    given = params.get("lr", AUTO)
    if _explicit(given) and abs(float(given) - lr) > 1e-12 * max(1.0, abs(lr)):
        raise ConfigError(f"optimizer.params.lr={given} in the DeepSpeed config contradicts the recipe "
                          f"(train.blr {recipe.train.blr} x batch {plan.global_batch} / 256 = {lr:g}); write \"auto\"")
    params["lr"] = lr
    if "betas" in params or recipe.train.betas is not None:  # absent from both: the optimizer's own default
        params["betas"] = _resolve_betas(params.get("betas", AUTO), recipe.train.betas)
    for key, value in list(params.items()):
        if value == AUTO:
            raise ConfigError(f"optimizer.params.{key} is 'auto', but the recipe does not derive it: give a value")
    ds.setdefault("gradient_clipping", 0.0)  # DeepSpeed would silently clip at 1.0
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
