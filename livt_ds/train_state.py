"""Where a run stands: its schedule and its training state (what a checkpoint must bring back).

- `Schedule`: lengths in optimizer steps, derived once from the recipe, the data size and the batch plan; the lr
  and the data-stream position are pure functions of the step.
- `TrainState`: step, data position of that step, best evaluation, last saved step, skipped counts: typed,
  versioned, saved inside every checkpoint (and as ``train_state.json`` next to it, readable by people and by
  `plan_resume`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from livt_ds.config import Recipe
from livt_ds.data.pipeline import StreamPosition
from livt_ds.errors import ConfigError, StateError
from livt_ds.optim import lr_at

STATE_VERSION = 1


def steps_per_epoch(num_samples: int, global_batch: int, fixed: int | None = None) -> int:
    """Optimizer steps of one epoch: one pass over the split's samples, or ``fixed`` (``train.steps_per_epoch``)."""
    return fixed or num_samples // global_batch


@dataclass(frozen=True)
class Schedule:
    """Lengths, all in optimizer steps, derived once from the recipe, the data size and the batch plan."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    accumulation: int
    global_batch: int
    base_lr: float
    min_lr: float = 0.0
    num_samples: int = 0  # of the training split

    @classmethod
    def plan(cls, recipe: Recipe, ds_config: dict[str, Any], num_samples: int) -> Schedule:
        """The schedule of ``recipe`` on ``num_samples`` training samples with the resolved DeepSpeed batch plan."""
        batch = ds_config["train_batch_size"]
        per_epoch = steps_per_epoch(num_samples, batch, recipe.train.steps_per_epoch)
        if per_epoch < 1:
            raise ConfigError(f"{recipe.data.path}: {num_samples} training samples is less than one batch of "
                              f"{batch}; lower train.batch_size or set train.steps_per_epoch")
        return cls(per_epoch, recipe.train.epochs * per_epoch, round(recipe.train.warmup_epochs * per_epoch),
                   ds_config["gradient_accumulation_steps"], batch, ds_config["optimizer"]["params"]["lr"],
                   recipe.train.min_lr, num_samples)

    def replan(self, recipe: Recipe) -> Schedule:
        """The schedule ``recipe`` has on the same data with the same batch plan and lr (another length)."""
        batch_plan = {"train_batch_size": self.global_batch, "gradient_accumulation_steps": self.accumulation,
                      "optimizer": {"params": {"lr": self.base_lr}}}
        return dataclasses.replace(Schedule.plan(recipe, batch_plan, self.num_samples), min_lr=self.min_lr)

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def lr(self, step: int) -> float:
        """The lr of optimizer step ``step`` (0-based): warm-up, then half-cycle cosine to ``min_lr``."""
        return lr_at(step, base_lr=self.base_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def ends_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def evaluation_due(self, step: int, every: int) -> bool:
        """Evaluate at the end of every ``every``-th epoch (``eval.every``; 0: never) and of the last one."""
        return self.ends_epoch(step) and (step == self.total_steps or bool(every and self.epoch_of(step) % every == 0))

    def stream_position(self, step: int, *, seed: int, rank: int, world: int, workers: int) -> StreamPosition:
        """The data stream right after optimizer step ``step``: the epoch it falls in and the micro-batches of that
        epoch already consumed (the one place both are computed)."""
        return StreamPosition(seed=seed, epoch=self.epoch_of(step), rank=rank, world=world, workers=workers,
                              batches=self.micro_batches_per_epoch,
                              skip=(step % self.steps_per_epoch) * self.accumulation)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Best:
    """The best evaluation so far: the task's metric, its value, and the step / checkpoint tag it came from."""

    metric: str
    value: float
    step: int
    tag: str


@dataclass
class TrainState:
    """Where the run stands, and what a resumed run needs besides the weights and the optimizer (those are the
    engine's): the step, where the data stream stands after it, the best evaluation, the last saved step, and the
    corrupt samples and unreadable shard reads skipped by all ranks since the run began. The only owner of these."""

    stage: str
    step: int = 0
    best: Best | None = None
    last_saved: int | None = None
    stream: dict[str, int] = field(default_factory=dict)  # StreamPosition of ``step`` without the rank
    skipped: dict[str, int] = field(default_factory=dict)  # {"samples", "shards"} skipped by all ranks up to ``step``
    data_sha256: str | None = None  # the shard set's meta.json digest: a resume may read another copy of the set
    version: int = STATE_VERSION
    _counted: dict[str, int] = field(default_factory=dict, repr=False, compare=False)  # this launch's, in skipped

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "stage": self.stage, "step": self.step,
                "best": dataclasses.asdict(self.best) if self.best else None, "last_saved": self.last_saved,
                "stream": dict(self.stream), "skipped": dict(self.skipped), "data_sha256": self.data_sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> TrainState:
        """Read a saved state; ``where`` names the checkpoint in errors."""
        if data.get("version", STATE_VERSION) > STATE_VERSION:
            raise StateError(f"{where}: training state version {data['version']} is newer than this livt-ds reads "
                             f"({STATE_VERSION}); upgrade livt-ds to resume it")
        best = data.get("best")
        try:
            return cls(stage=data["stage"], step=int(data["step"]), best=Best(**best) if best else None,
                       last_saved=data.get("last_saved"), stream=dict(data.get("stream") or {}),
                       skipped=dict(data.get("skipped") or {}), data_sha256=data.get("data_sha256"),
                       version=STATE_VERSION)
        except (KeyError, TypeError) as exc:
            raise StateError(f"{where}: unreadable training state {data!r}: {exc}") from None

    def advance(self, stream: StreamPosition) -> None:
        """One optimizer step done; ``stream``: where the data stream stands after it."""
        self.step += 1
        self.stream = stream.without_rank()

    def count_skipped(self, counts: dict[str, int]) -> dict[str, int]:
        """Fold in ``counts``, what this launch's loaders skipped on all ranks so far; returns the run's totals."""
        for key, value in counts.items():
            self.skipped[key] = self.skipped.get(key, 0) + value - self._counted.get(key, 0)
        self._counted = dict(counts)
        return dict(self.skipped)

    def better(self, metric: str, value: float | None, mode: str) -> bool:
        """True when ``value`` beats the best so far (``mode``: "min" or "max")."""
        if value is None:
            return False
        if self.best is None:
            return True
        return value < self.best.value if mode == "min" else value > self.best.value

    def record_evaluation(self, metric: str, value: float | None, mode: str, tag: str) -> bool:
        """Keep the evaluation of this step as the best when it beats the best so far; True when it does."""
        if not self.better(metric, value, mode):
            return False
        self.best = Best(metric, value, self.step, tag)
        return True
