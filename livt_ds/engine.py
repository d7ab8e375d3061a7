"""The one training loop both stages share: DeepSpeed engine, schedule, steps, evaluation, checkpoints, logs.

A task object (tasks.py) supplies the model, the transforms, the loss of a step and the evaluation; nothing here
branches on the stage.
"""

from __future__ import annotations

import json
import math
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from livt_ds import checkpoint, dist, provenance
from livt_ds.config import ConfigError, Recipe, load_ds_config, recipe_to_dict, resolve_ds_config, save_recipe
from livt_ds.data.pipeline import eval_loader, settle_feeder_threads, skipped_samples, skipped_shards, train_loader
from livt_ds.data.remote import RemoteOptions
from livt_ds.data.shards import load_meta
from livt_ds.optim import apply_lr, lr_at, param_groups
from livt_ds.tasks import EvalResult, build_task, save_images, seed_everything
from livt_ds.train_state import write_status


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops without writing a checkpoint."""


@dataclass(frozen=True)
class Schedule:
    """Lengths, all in optimizer steps, derived once from the recipe, the data size and the batch plan."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    accumulation: int
    global_batch: int
    base_lr: float

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation


def build_engine(task, recipe: Recipe, ds_config: dict[str, Any]):
    """The task's model in a DeepSpeed engine with the optimizer from the JSON and the recipe's param groups.
    Returns (engine, optimizer, input dtype)."""
    import deepspeed

    seed_everything(recipe.train.seed)  # identical initial weights on every rank
    model = task.build_model()
    weight_decay = ds_config["optimizer"]["params"].get("weight_decay", 0.0)
    groups = param_groups(model, weight_decay, recipe.train.layer_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else (torch.float16 if engine.fp16_enabled() else torch.float32)
    return engine, optimizer, dtype


def train_micro_step(engine, task, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One micro-batch: host batch -> device, the task's batch preparation (mixup) on the device, forward in the
    engine's dtype, backward, and ``engine.step()`` (which updates only at an accumulation boundary)."""
    images, targets = task.prepare_batch(images.to(engine.device, non_blocking=True),
                                         labels.to(engine.device, non_blocking=True))
    loss = task.loss(engine, images.to(dtype), targets)
    engine.backward(loss)
    engine.step()
    return loss


class Logger:
    """metrics.jsonl + TensorBoard + a progress bar, all on rank 0 only."""

    def __init__(self, output: Path, recipe: Recipe, total_steps: int, start_step: int) -> None:
        self.enabled = dist.is_main()
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        self.jsonl = open(output / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if recipe.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"))
        if recipe.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}{k}": v for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}{key}", value, step)
        if self.bar is not None and "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        if self.enabled and self.writer is not None:
            for name, image in images.items():
                self.writer.add_image(f"eval/{name}", image, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(f"[livt] {text}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()


class Trainer:
    def __init__(self, stage: str, recipe: Recipe, ds_config_path: str, output: str | Path, resume: str = "auto",
                 allow_recipe_change: bool = False):
        self.stage = stage
        self.recipe = recipe
        self.output = Path(output)
        self.resume = resume
        self.allow_recipe_change = allow_recipe_change
        self.ds_config_path = ds_config_path
        self.stop_requested = False
        self.lock: provenance.RunLock | None = None
        self.recipe_change: dict[str, list] | None = None  # diff against the checkpoint's recipe, on resume
        self.saved_recipe: dict[str, Any] | None = None
        self.schedule_change: dict[str, list] | None = None  # length changed on resume (--allow-recipe-change)
        self.step_reached = 0

    # ----------------------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        recipe = self.recipe
        if not recipe.data.path:
            raise ConfigError("data.path is empty: point it at a shard set made by scripts/make_shards.py")
        self.remote = RemoteOptions.from_config(recipe.data)
        self.meta = load_meta(recipe.data.path, self.remote)
        world = dist.world_size()
        ds_config = resolve_ds_config(load_ds_config(self.ds_config_path), recipe, world)
        self.task = build_task(self.stage, recipe, self.meta)
        plan_batch = ds_config["train_batch_size"]
        accumulation = ds_config["gradient_accumulation_steps"]
        self.micro_batch = ds_config["train_micro_batch_size_per_gpu"]
        num_samples = self.meta["splits"][recipe.data.train_split]["num_samples"]
        steps_per_epoch = recipe.train.steps_per_epoch or num_samples // plan_batch
        if steps_per_epoch < 1:
            raise ConfigError(f"{recipe.data.path}: {num_samples} training samples is less than one batch of "
                              f"{plan_batch}; lower train.batch_size or set train.steps_per_epoch")
        total = recipe.train.epochs * steps_per_epoch
        self.schedule = Schedule(steps_per_epoch, total, round(recipe.train.warmup_epochs * steps_per_epoch),
                                 accumulation, plan_batch, ds_config["optimizer"]["params"]["lr"])
        self._claim_run_folder()
        self.resume_from = self.resume_source = checkpoint.find_resume(self.output, self.resume)
        if self.resume_from is not None:
            self._check_recipe_change()
            ckpt_dir, tag = self.resume_from
            if checkpoint.saved_world_size(ckpt_dir / tag) != world:
                self.resume_from = (ckpt_dir, checkpoint.to_universal(ckpt_dir, tag))
                ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.ds_config = ds_config
        if dist.is_main():
            self.output.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, self.output / "config.yaml")
            (self.output / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
            info = {"stage": self.stage, "world_size": world, "num_classes": self.meta.get("num_classes"),
                    "data": recipe.data.path, "schedule": self.schedule.__dict__}
            (self.output / "run.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
        dist.barrier()

    def _claim_run_folder(self) -> None:
        """Rank 0 takes the run folder's lock; every rank fails together when another live run holds it."""
        error = None
        if dist.is_main():
            try:
                self.lock = provenance.RunLock(self.output).acquire()
            except provenance.RunLockedError as exc:
                error = str(exc)
        error = dist.broadcast_object(error)
        if error:
            raise provenance.RunLockedError(error)

    def _check_recipe_change(self) -> None:
        """Refuse (on every rank) a resume whose recipe changes what the checkpoint was trained with."""
        source_dir, source_tag = self.resume_source
        error, diff, saved = None, None, None
        if dist.is_main():
            saved = checkpoint.saved_recipe(source_dir / source_tag)
            if saved is not None:
                try:
                    diff = provenance.check_resume_recipe(saved, recipe_to_dict(self.recipe),
                                                          allow=self.allow_recipe_change,
                                                          checkpoint=str(source_dir / source_tag),
                                                          output=str(self.output))
                except ConfigError as exc:
                    error = str(exc)
        error, diff, saved = dist.broadcast_object((error, diff, saved))
        if error:
            raise ConfigError(error)
        self.recipe_change, self.saved_recipe = diff, saved

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build_engine(self) -> None:
        self.engine, self.optimizer, self.dtype = build_engine(self.task, self.recipe, self.ds_config)
        seed_everything(self.recipe.train.seed * 1000 + dist.rank())  # distinct masks / drop-path per rank

    def cast(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.engine.device, dtype=self.dtype, non_blocking=True)

    # ----------------------------------------------------------------------------------------- state
    def _client_state(self, step: int) -> dict[str, Any]:
        s = self.schedule
        return {"step": step, "epoch": step // s.steps_per_epoch,
                "data_position": {"epoch": step // s.steps_per_epoch,
                                  "micro_batches_done": (step % s.steps_per_epoch) * s.accumulation},
                "rng": dist.gather_objects(checkpoint.rng_state()), "world_size": dist.world_size(),
                "recipe": recipe_to_dict(self.recipe), "stage": self.stage, "best": self.best}

    def _restore(self) -> int:
        source_dir, source_tag = self.resume_source
        checkpoint.check_model_matches(self.engine.module, source_dir / source_tag)
        ckpt_dir, tag = self.resume_from
        client = checkpoint.load(self.engine, ckpt_dir, tag)
        if client.get("stage") not in (None, self.stage):
            raise checkpoint.CheckpointError(f"{ckpt_dir / tag} is a '{client['stage']}' checkpoint, "
                                             f"not '{self.stage}'")
        step = int(client.get("step", 0))
        self.best = client.get("best") or self.best
        rng = client.get("rng") or []
        if len(rng) == dist.world_size():
            checkpoint.set_rng_state(rng[dist.rank()])
        self.logger_msg = f"resumed from {ckpt_dir / tag} at step {step}"
        self.schedule_change = self._schedule_change(step)
        if self.schedule_change:
            c = self.schedule_change
            self.logger_msg += (f"; the schedule now ends at step {c['total_steps'][1]} (was {c['total_steps'][0]}): "
                                f"lr at step {step} {c['lr_at_resume'][0]:.3g} -> {c['lr_at_resume'][1]:.3g}")
        return step

    def _schedule_change(self, step: int) -> dict[str, list] | None:
        """A resume with another length (allowed on purpose) follows, from its first step on, the warm-up + cosine
        of a run planned with the new length from the start: the lr is still a pure function of the step."""
        if not self.saved_recipe or not self.recipe_change:
            return None
        old = self.saved_recipe.get("train", {})
        s = self.schedule
        old_total = int(old.get("epochs", self.recipe.train.epochs)) * int(old.get("steps_per_epoch") or
                                                                          s.steps_per_epoch)
        if old_total == s.total_steps:
            return None
        old_lr = lr_at(step, base_lr=s.base_lr, min_lr=self.recipe.train.min_lr, warmup_steps=s.warmup_steps,
                       total_steps=old_total)
        return {"total_steps": [old_total, s.total_steps], "lr_at_resume": [old_lr, self._lr(step)]}

    def _status(self, phase: str, step: int) -> None:
        if dist.is_main():
            write_status(self.output, phase, step)

    def _save(self, step: int) -> None:
        if self.nonfinite_step() is not None:
            return
        self._status("save", step)
        keep = {self.best["tag"]} if self.best.get("tag") else set()
        checkpoint.save(self.engine, self.output, step, self._client_state(step), self.recipe.checkpoint.keep_last,
                        keep)
        self.last_saved = step
        self._status("train", step)

    # ----------------------------------------------------------------------------------------- checks
    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.stop_requested = True

    def nonfinite_step(self) -> int | None:
        """The first optimizer step (1-based, as logged) whose loss was not finite on any rank, or None.
        One host sync: called at log intervals and before checkpoints only."""
        bad = int(self.first_bad.item())
        bad = bad if bad >= 0 else 10**12
        worst = dist.gather_objects(bad)
        first = min(worst)
        return None if first >= 10**12 else first

    # ----------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        """Train to the end (or a stop); the run folder's lock is held throughout and released on any exit."""
        try:
            return self._run()
        finally:
            self._release_lock()

    def _run(self) -> dict[str, Any]:
        self._setup()
        self._build_engine()
        self.best: dict[str, Any] = {}
        self.last_saved = -1
        start = self._restore() if self.resume_from else 0
        s = self.schedule
        end = s.total_steps if self.recipe.train.stop_after_steps is None else min(
            s.total_steps, self.recipe.train.stop_after_steps)
        log = Logger(self.output, self.recipe, s.total_steps, start)
        if self.resume_from:
            log.message(self.logger_msg)
        log.message(f"{self.stage}: {s.total_steps} steps ({self.recipe.train.epochs} epochs x {s.steps_per_epoch}), "
                    f"batch {s.global_batch} = {self.micro_batch} x {s.accumulation} x {dist.world_size()} ranks, "
                    f"lr {s.base_lr:.3g}, output {self.output}")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.siginterrupt(signal.SIGTERM, False)  # restart interrupted system calls (gloo/nccl sockets)
        segment = self._history_start(start)
        self.step_reached, reason = start, "error"
        try:
            self._status("train", start)
            self._loop(start, end, log)
            reason = ("sigterm" if self.stop_requested else "finished" if self.step_reached >= s.total_steps
                      else "stop_after_steps")
            self._status("finished" if reason == "finished" else "stopped", self.step_reached)
        except BaseException as exc:
            reason = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            self._status("failed", self.step_reached)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            log.close()
            if segment is not None:
                provenance.History(self.output).end(segment, end_step=self.step_reached, reason=reason)
        return self.best

    def _history_start(self, start: int) -> int | None:
        hosts = sorted(set(dist.gather_objects(socket.gethostname())))
        if not dist.is_main():
            return None
        source = self.resume_source
        return provenance.History(self.output).start(
            stage=self.stage, recipe=recipe_to_dict(self.recipe), start_step=start, world_size=dist.world_size(),
            hosts=hosts, resumed_from=str(source[0] / source[1]) if source else None, diff=self.recipe_change,
            schedule={**self.schedule.__dict__, "change": self.schedule_change})

    def _loop(self, start: int, end: int, log: Logger) -> None:
        s, recipe = self.schedule, self.recipe
        device = self.engine.device
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        step = start
        loss_sum = torch.zeros((), device=device)
        micro_count, window_start, window_steps = 0, time.time(), 0
        train_tf = self.task.train_transform()
        while step < end and not self.stop_requested:
            epoch = step // s.steps_per_epoch
            skip = (step % s.steps_per_epoch) * s.accumulation
            loader = train_loader(recipe.data.path, split=recipe.data.train_split, transform=train_tf,
                                  batch_size=self.micro_batch, num_workers=recipe.data.num_workers,
                                  seed=recipe.train.seed, epoch=epoch, rank=dist.rank(),
                                  world_size=dist.world_size(), num_batches=s.micro_batches_per_epoch,
                                  skip_batches=skip, pin_memory=torch.cuda.is_available(), remote=self.remote)
            self.engine.train()
            settle_feeder_threads()
            for images, labels in loader:
                if micro_count % s.accumulation == 0:
                    apply_lr(self.optimizer, self._lr(step))
                loss = train_micro_step(self.engine, self.task, images, labels, self.dtype)
                detached = loss.detach().float()
                loss_sum += detached
                self.first_bad = torch.where(torch.isfinite(detached) | (self.first_bad >= 0), self.first_bad,
                                             torch.full_like(self.first_bad, step + 1))
                micro_count += 1
                if micro_count % s.accumulation:
                    continue
                step += 1
                self.step_reached = step
                window_steps += 1
                log.advance()
                if step % recipe.log.every_steps == 0 or step == end:
                    self._check_finite()
                    self._log_train(step, log, loss_sum / (window_steps * s.accumulation),
                                    window_steps * s.global_batch / max(time.time() - window_start, 1e-9))
                    loss_sum.zero_()
                    window_start, window_steps = time.time(), 0
                if self._step_end(step, end, log):
                    break
        if self.last_saved != step and step > start:
            self._check_finite()
            self._save(step)

    def _step_end(self, step: int, end: int, log: Logger) -> bool:
        """Evaluate / checkpoint / stop after optimizer step ``step``; True when the run must stop."""
        stop = dist.any_rank(self.stop_requested)
        every = self.recipe.checkpoint.every_steps
        evaluated = step % self.schedule.steps_per_epoch == 0 and self._maybe_evaluate(step, log)
        if stop or step >= end or evaluated or (every and step % every == 0):
            self._check_finite()
            self._save(step)
        if stop:
            self.stop_requested = True
            log.message(f"SIGTERM: saved a checkpoint at step {step}; continue with --resume auto")
        return stop or step >= end

    def _lr(self, step: int) -> float:
        s = self.schedule
        return lr_at(step, base_lr=s.base_lr, min_lr=self.recipe.train.min_lr, warmup_steps=s.warmup_steps,
                     total_steps=s.total_steps)

    def _check_finite(self) -> None:
        bad = self.nonfinite_step()
        if bad is not None:
            raise NonFiniteLossError(
                f"the loss became non-finite at optimizer step {bad} (stage {self.stage}); no checkpoint was written "
                f"at or after it (latest: {self.last_saved if self.last_saved >= 0 else 'none'}). Lower train.blr, "
                "check the data, or enable gradient_clipping in the DeepSpeed config.")

    def _log_train(self, step: int, log: Logger, loss: torch.Tensor, images_per_s: float) -> None:
        values = {"loss": float(dist.all_reduce_mean(loss).item()), "lr": self._lr(step - 1),
                  "images_per_s": images_per_s, "epoch": step / self.schedule.steps_per_epoch}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            values["grad_norm"] = float(norm)
        counts = dist.gather_objects((skipped_samples(), skipped_shards()))  # since each rank's process started
        values["data/skipped_samples"] = sum(c[0] for c in counts)
        values["data/skipped_shards"] = sum(c[1] for c in counts)
        log.scalars(step, values, prefix="")

    def _maybe_evaluate(self, step: int, log: Logger) -> bool:
        """Evaluate at the end of every ``eval.every``-th epoch and of the last one."""
        epoch = step // self.schedule.steps_per_epoch
        every = self.recipe.eval.every
        if not (step == self.schedule.total_steps or (every and epoch % every == 0)):
            return False
        self._check_finite()
        self._status("eval", step)
        self._record_eval(step, log, self.evaluate())
        self._status("train", step)
        return True

    def evaluate(self) -> EvalResult:
        recipe = self.recipe
        loader = eval_loader(recipe.data.path, split=recipe.data.eval_split, transform=self.task.eval_transform(),
                             batch_size=recipe.eval.batch_size, num_workers=recipe.data.num_workers,
                             rank=dist.rank(), world_size=dist.world_size(), remote=self.remote)
        self.engine.eval()
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            result = self.task.evaluate(self.engine, self.engine.module, loader, self.cast)
        self.engine.train()
        return result

    def _record_eval(self, step: int, log: Logger, result: EvalResult) -> None:
        metrics = {k: v for k, v in result.metrics.items() if not isinstance(v, (list, dict))}
        log.scalars(step, metrics, prefix="eval/")
        log.images(step, result.images)
        key, mode = self.task.best_metric
        value = result.metrics.get(key)
        better = value is not None and (not self.best or (
            value < self.best["value"] if mode == "min" else value > self.best["value"]))
        if better:
            self.best = {"metric": key, "value": value, "step": step, "tag": checkpoint.step_tag(step)}
        if dist.is_main():
            record = {"step": step, "epoch": step / self.schedule.steps_per_epoch, **result.metrics}
            (self.output / "metrics.json").write_text(json.dumps(record, indent=2))
            if better:
                (self.output / "best_metrics.json").write_text(json.dumps(record, indent=2))
            save_images(result.images, self.output / "plots", step)
            summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            log.message(f"eval at step {step}: {summary}")
