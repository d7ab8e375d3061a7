"""Where a run stands: its schedule, its training state (what a checkpoint must bring back), and its phase.

- `Schedule`: lengths in optimizer steps, derived once from the recipe, the data size and the batch plan; the lr
  and the data-stream position are pure functions of the step.
- `TrainState`: step, best evaluation, last saved step and the data position of that step: typed, versioned,
  saved inside every checkpoint (and as ``train_state.json`` next to it, readable by people and by `plan_resume`).
- ``RUN/status.json``: the phase, rewritten by global rank 0 at every phase change, never in the middle of one:
  ``{"phase": "setup" | "train" | "eval" | "save" | "finished" | "stopped" | "failed", "step": int, "pid": int,
  "time": float}`` (``step``: the last completed optimizer step). A run killed without warning leaves the phase it
  was in, which tells a run that died while saving from one that died while training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livt_ds.config import ConfigError, Recipe
from livt_ds.data.pipeline import StreamPosition
from livt_ds.optim import lr_at

STATE_VERSION = 1
PHASES = ("setup", "train", "eval", "save", "finished", "stopped", "failed")


class StateError(ValueError):
    """A saved training state this version cannot read."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a reader (or a process killed at any moment) sees the old or the new file, never a
    partial one: write a sibling temp file, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process's umask: the mode an ordinary new file gets (read without changing the umask,
    which is process-wide, where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return base & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def follow_umask(path: Path) -> None:
    """Give ``path`` the mode of an ordinary new file: writers that go through a private temporary file (safetensors
    does) leave it 0600, unreadable to the group the user's umask shares files with."""
    os.chmod(path, umask_mode())


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2))


def write_status(run_dir: Path, phase: str, step: int) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")
    write_json_atomic(Path(run_dir) / "status.json",
                      {"phase": phase, "step": int(step), "pid": os.getpid(), "time": time.time()})


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
                   recipe.train.min_lr)

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
    """What a resumed run needs besides the weights and the optimizer (those are the engine's): the step, the
    best evaluation, the last saved step, and where the data stream stands (to check a resume continues it)."""

    stage: str
    step: int = 0
    best: Best | None = None
    last_saved: int | None = None
    stream: dict[str, int] = field(default_factory=dict)  # StreamPosition of ``step`` without the rank
    skipped: dict[str, int] = field(default_factory=dict)  # {"samples", "shards"} skipped by all ranks up to ``step``
    data_sha256: str | None = None  # the shard set's meta.json digest: a resume may read another copy of the set
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "stage": self.stage, "step": self.step,
                "best": dataclasses.asdict(self.best) if self.best else None, "last_saved": self.last_saved,
                "stream": dict(self.stream), "skipped": dict(self.skipped), "data_sha256": self.data_sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> TrainState:
        """Read a saved state; ``where`` names the checkpoint in errors. A checkpoint of an earlier version (no
        ``version``: step and best at the top of the client state) is read too."""
        if "version" not in data:
            data = {"version": 0, "stage": data.get("stage"), "step": data.get("step", 0),
                    "best": data.get("best") or None, "last_saved": data.get("step"), "stream": {}}
        if data["version"] > STATE_VERSION:
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

    def better(self, metric: str, value: float | None, mode: str) -> bool:
        """True when ``value`` beats the best so far (``mode``: "min" or "max")."""
        if value is None:
            return False
        if self.best is None:
            return True
        return value < self.best.value if mode == "min" else value > self.best.value
