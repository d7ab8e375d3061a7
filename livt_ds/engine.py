"""The one training loop both stages share: DeepSpeed engine, schedule, steps, evaluation, checkpoints, logs.

A task (tasks.py) supplies the model, the transforms, the loss of a step and the evaluation; the checkpoint
manager (checkpoint.py) decides when to save and owns what is saved and restored; nothing here branches on the stage.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from livt_ds import checkpoint, dist, provenance
from livt_ds.checkpoint import CheckpointManager, ResumePlan
from livt_ds.config import ConfigError, Recipe, load_ds_config, recipe_to_dict, resolve_ds_config, save_recipe
from livt_ds.cuda_arch import set_plain_cuda_arch_list
from livt_ds.data.pipeline import skipped_samples, skipped_shards, train_loader
from livt_ds.data.remote import DataSourceOutage, RemoteOptions
from livt_ds.data.shards import load_meta, meta_digest
from livt_ds.evaluate import evaluate, save_evaluation
from livt_ds.optim import apply_lr, lr_at, param_groups
from livt_ds.run_log import Logger
from livt_ds.seeding import seed_everything
from livt_ds.step_feed import step_batches
from livt_ds.tasks import Task, build_task
from livt_ds.test_split import evaluate_test_once
from livt_ds.train_state import Best, Schedule, TrainState, write_status


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops without writing a checkpoint."""


def build_engine(task: Task, recipe: Recipe, ds_config: dict[str, Any]):
    """The task's model in a DeepSpeed engine with the optimizer from the JSON and the recipe's param groups.
    Returns (engine, optimizer, input dtype)."""
    import deepspeed

    seed_everything(recipe.train.seed)  # identical initial weights on every rank
    model = task.build_model()
    weight_decay = ds_config["optimizer"]["params"].get("weight_decay", 0.0)
    groups = param_groups(model, weight_decay, recipe.train.layer_decay)
    set_plain_cuda_arch_list()  # before DeepSpeed builds an op: it cannot parse torch's "9.0a"
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else (torch.float16 if engine.fp16_enabled() else torch.float32)
    return engine, optimizer, dtype


def train_micro_step(engine, task: Task, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    """One micro-batch: host batch -> device, the task's batch preparation (mixup) on the device, forward in the
    engine's dtype, backward, and ``engine.step()`` (which updates only at an accumulation boundary)."""
    images, targets = task.prepare_batch(images.to(engine.device, non_blocking=True),
                                         labels.to(engine.device, non_blocking=True))
    loss = task.loss(engine, images.to(dtype), targets)
    engine.backward(loss)
    engine.step()
    return loss


class LossWindow:
    """The training loss since the last log line and the first non-finite step, kept on the device: one host
    sync per log line, none per step."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.micro_batches, self.steps, self.start = 0, 0, time.time()

    def add(self, loss: torch.Tensor, step: int) -> None:
        """The loss of a micro-batch of optimizer step ``step`` (0-based)."""
        loss = loss.detach().float()
        self.total += loss
        self.micro_batches += 1
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad,
                                     torch.full_like(self.first_bad, step + 1))

    def first_nonfinite_step(self) -> int | None:
        """The first optimizer step (1-based, as logged) whose loss was not finite on any rank (a collective)."""
        bad = int(self.first_bad.item())
        first = min(dist.gather_objects(bad if bad >= 0 else 10**12))
        return None if first >= 10**12 else first

    def take(self) -> tuple[torch.Tensor, int, float]:
        """(mean loss on this rank, optimizer steps, seconds) since the last call; starts a new window."""
        mean, steps, seconds = self.total / max(self.micro_batches, 1), self.steps, time.time() - self.start
        self.total = torch.zeros_like(self.total)
        self.micro_batches, self.steps, self.start = 0, 0, time.time()
        return mean, steps, seconds


class Trainer:
    """One launch of a stage in a run folder: set up, resume, train, evaluate, checkpoint; the folder's lock is held
    throughout. Every attribute exists once ``__init__`` returns; `run` fills in the engine and the state."""

    def __init__(self, stage: str, recipe: Recipe, ds_config_path: str, output: str | Path, *, resume: str,
                 allow_recipe_change: bool = False, overwrite: bool = False):
        if not recipe.data.path:
            raise ConfigError("data.path is empty: point it at a shard set made by scripts/make_shards.py")
        self.stage, self.recipe, self.output = stage, recipe, Path(output)
        self.resume, self.allow_recipe_change, self.overwrite = resume, allow_recipe_change, overwrite
        self.world = dist.world_size()
        self.remote = RemoteOptions.from_config(recipe.data)
        self.meta = load_meta(recipe.data.path, self.remote)
        self.data_sha256 = meta_digest(self.meta)  # a resume may read another copy of the same set
        self.ds_config = resolve_ds_config(load_ds_config(ds_config_path), recipe, self.world)
        self.micro_batch = self.ds_config["train_micro_batch_size_per_gpu"]
        self.task = build_task(stage, recipe, self.meta)
        self.schedule = Schedule.plan(recipe, self.ds_config, self.meta["splits"][recipe.data.train_split][
            "num_samples"])
        stop_after = recipe.train.stop_after_steps
        self.end = self.schedule.total_steps if stop_after is None else min(self.schedule.total_steps, stop_after)
        self.checkpoints = CheckpointManager(self.output, recipe.checkpoint)
        self.state = TrainState(stage)
        self.start_step = 0
        self.plan: ResumePlan | None = None
        self.lock: provenance.RunLock | None = None
        self.saved_recipe: dict[str, Any] | None = None  # the checkpoint's recipe, on resume
        self.recipe_change: dict[str, list] | None = None  # its diff against this recipe
        self.schedule_change: dict[str, list] | None = None  # length changed on resume (--allow-recipe-change)
        self.engine = self.optimizer = None
        self.dtype = torch.float32
        self.log: Logger | None = None
        self.window: LossWindow | None = None
        self.finite_through = -1  # the losses of every step up to this one were checked finite on all ranks
        self.skipped_before: dict[str, int] = {}  # skipped samples / shards of the launches before this one
        self.stop_requested = False

    # ----------------------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        """Train to the end (or a stop); returns the best evaluation ({} when none)."""
        try:
            self._claim_run_folder()
            self.plan = checkpoint.agree_on_resume(self.output, self.resume, self.world, overwrite=self.overwrite)
            if self.overwrite:
                self._discard_earlier_run()
            if self.plan is not None:
                self._check_recipe_change()
            self._write_run_files()
            self._build_engine()
            if self.plan is not None:
                self._restore()
            self._train()
            return dataclasses.asdict(self.state.best) if self.state.best else {}
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> None:
        """The loop inside its bookkeeping: log, SIGTERM handler, history segment and phase file."""
        s = self.schedule
        self.log = Logger(self.output, tensorboard=self.recipe.log.tensorboard, progress=self.recipe.log.progress,
                          total_steps=s.total_steps, start_step=self.start_step)
        self.window = LossWindow(self.engine.device)
        for text in self._resume_messages():
            self.log.message(text)
        self.log.message(f"{self.stage}: {s.total_steps} steps ({self.recipe.train.epochs} epochs x "
                         f"{s.steps_per_epoch}), batch {s.global_batch} = {self.micro_batch} x {s.accumulation} x "
                         f"{self.world} ranks, lr {s.base_lr:.3g}, output {self.output}")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.siginterrupt(signal.SIGTERM, False)  # restart interrupted system calls (gloo/nccl sockets)
        segment = self._history_start()
        reason = "error"
        try:
            self._status("train")
            self._loop()
            evaluate_test_once(self.task, self.recipe, self.output, self.remote, self.state, self.log,
                               finished=self.state.step >= s.total_steps)
            reason = ("sigterm" if self.stop_requested else "finished" if self.state.step >= s.total_steps
                      else "stop_after_steps")
            self._status("finished" if reason == "finished" else "stopped")
        except BaseException as exc:
            reason = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            if isinstance(exc, DataSourceOutage):  # every rank is here, at the same step boundary (step_batches)
                raise self._save_for_outage(exc) from None
            self._status("failed")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.log.close()
            if segment is not None:
                provenance.History(self.output).end(segment, end_step=self.state.step, reason=reason)

    def _loop(self) -> None:
        """Step, maybe log, maybe evaluate, maybe save, maybe stop."""
        for _ in self._optimizer_steps():
            step = self.state.step
            if step % self.recipe.log.every_steps == 0 or step == self.end:
                self._log_train()
            evaluated = self._maybe_evaluate()
            stop = dist.any_rank(self.stop_requested)  # SIGTERM reached some rank: every rank stops here
            last = stop or step >= self.end
            if self.checkpoints.due(step, evaluated=evaluated, final=last):
                self._save()
            if stop:
                self.stop_requested = True
                self.log.message(f"SIGTERM: saved a checkpoint at step {step}; continue with --resume auto")
            if last:
                return

    def _optimizer_steps(self) -> Iterator[None]:
        """Train micro-batch by micro-batch from the state's position through one loader that runs every remaining
        epoch; yield after each optimizer step (``state.step`` advanced). The caller stops at ``self.end``."""
        s, state, recipe = self.schedule, self.state, self.recipe
        if state.step >= self.end:
            return
        loader = train_loader(recipe.data.path, self._position(state.step), epochs=recipe.train.epochs,
                              split=recipe.data.train_split, transform=self.task.train_transform(),
                              batch_size=self.micro_batch, pin_memory=torch.cuda.is_available(), remote=self.remote)
        self.engine.train()
        for micro, (images, labels) in enumerate(step_batches(loader, s.accumulation), start=1):
            if (micro - 1) % s.accumulation == 0:  # the first micro-batch of an optimizer step
                apply_lr(self.optimizer, s.lr(state.step))
                self.task.set_epoch(s.epoch_of(state.step))
            self.window.add(train_micro_step(self.engine, self.task, images, labels, self.dtype), state.step)
            if micro % s.accumulation == 0:
                state.step += 1
                self.window.steps += 1
                self.log.advance()
                yield

    # ----------------------------------------------------------------------------------------- set-up
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
        error, diff, saved = None, None, None
        if dist.is_main():
            saved = checkpoint.saved_recipe(self.plan.tag_dir)
            if saved is not None:
                new = recipe_to_dict(self.recipe)
                data_sha256 = (checkpoint.saved_data_sha256(self.plan.tag_dir), self.data_sha256)
                try:
                    diff = provenance.check_resume_recipe(saved, new,
                                                          allow=self.allow_recipe_change,
                                                          checkpoint=str(self.plan.tag_dir), output=str(self.output),
                                                          data_sha256=data_sha256)
                    provenance.refuse_change_that_trains_nothing(saved, new, diff, data_sha256,
                                                                 checkpoint.saved_step(self.plan.tag_dir), self.end,
                                                                 str(self.plan.tag_dir))
                except ConfigError as exc:
                    error = str(exc)
        error, diff, saved = dist.broadcast_object((error, diff, saved))
        if error:
            raise ConfigError(error)
        self.recipe_change, self.saved_recipe = diff, saved

    def _discard_earlier_run(self) -> None:
        """``--resume none --overwrite``: rank 0 deletes the earlier run's outputs (history.jsonl stays)."""
        if dist.is_main():
            deleted = provenance.discard_run_outputs(self.output)
            if deleted:
                print(f"[livt] --overwrite: deleted {', '.join(deleted)} of the earlier run in {self.output}")
        dist.barrier()

    def _write_run_files(self) -> None:
        if dist.is_main():
            self.output.mkdir(parents=True, exist_ok=True)
            write_status(self.output, "setup", 0)
            save_recipe(self.recipe, self.output / "config.yaml")
            (self.output / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            info = {"stage": self.stage, "world_size": self.world, "num_classes": self.meta.get("num_classes"),
                    "data": self.recipe.data.path, "schedule": self.schedule.as_dict()}
            (self.output / "run.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
        dist.barrier()

    def _build_engine(self) -> None:
        config = self.checkpoints.engine_config(self.plan, self.ds_config)
        self.engine, self.optimizer, self.dtype = build_engine(self.task, self.recipe, config)
        seed_everything(self.recipe.train.seed * 1000 + dist.rank())  # distinct masks / drop-path per rank

    def _restore(self) -> None:
        self.state = self.checkpoints.restore(self.engine, self.plan, self.stage)
        self.start_step = self.state.step
        self.skipped_before = dict(self.state.skipped)
        self.schedule_change = self._schedule_change(self.state.step)

    def _resume_messages(self) -> list[str]:
        if self.plan is None:
            return []
        step = self.state.step
        text = f"resumed from {self.plan.tag_dir} at step {step}"
        if self.schedule_change:
            c = self.schedule_change
            text += (f"; the schedule now ends at step {c['total_steps'][1]} (was {c['total_steps'][0]}): "
                     f"lr at step {step} {c['lr_at_resume'][0]:.3g} -> {c['lr_at_resume'][1]:.3g}")
        texts = [text]
        now = self._position(step).without_rank()
        saved = self.state.stream
        changed = {k: [saved[k], now[k]] for k in saved if k in now and saved[k] != now[k] and k != "batches"}
        if changed:
            texts.append(f"the data stream differs from the checkpoint's ({changed}): the batches from here on are "
                         "not those of an uninterrupted run (keep data.num_workers and the world size to resume "
                         "exactly)")
        return texts

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
        old_lr = lr_at(step, base_lr=s.base_lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps, total_steps=old_total)
        return {"total_steps": [old_total, s.total_steps], "lr_at_resume": [old_lr, s.lr(step)]}

    def _history_start(self) -> int | None:
        hosts = sorted(set(dist.gather_objects(socket.gethostname())))
        if not dist.is_main():
            return None
        return provenance.History(self.output).start(
            stage=self.stage, recipe=recipe_to_dict(self.recipe), start_step=self.start_step, world_size=self.world,
            hosts=hosts, resumed_from=str(self.plan.tag_dir) if self.plan else None, diff=self.recipe_change,
            schedule={**self.schedule.as_dict(), "change": self.schedule_change}, data_sha256=self.data_sha256)

    # ----------------------------------------------------------------------------------------- step parts
    def _position(self, step: int):
        return self.schedule.stream_position(step, seed=self.recipe.train.seed, rank=dist.rank(), world=self.world,
                                             workers=self.recipe.data.num_workers)

    def _status(self, phase: str) -> None:
        if dist.is_main():
            write_status(self.output, phase, self.state.step)

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.stop_requested = True

    def _check_finite(self) -> None:
        """Stop on a non-finite loss (a collective and a host sync: once per step at most, at log / eval / save)."""
        if self.finite_through == self.state.step:
            return
        bad = self.window.first_nonfinite_step()
        if bad is not None:
            saved = self.state.last_saved
            raise NonFiniteLossError(
                f"the loss became non-finite at optimizer step {bad} (stage {self.stage}); no checkpoint was written "
                f"at or after it (latest: {saved if saved is not None else 'none'}). Lower train.blr, "
                "check the data, or enable gradient_clipping in the DeepSpeed config.")
        self.finite_through = self.state.step

    def _log_train(self) -> None:
        self._check_finite()
        step = self.state.step
        loss, steps, seconds = self.window.take()
        values = {"loss": float(dist.all_reduce_mean(loss).item()), "lr": self.schedule.lr(step - 1),
                  "images_per_s": steps * self.schedule.global_batch / max(seconds, 1e-9),
                  "epoch": step / self.schedule.steps_per_epoch}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            values["grad_norm"] = float(norm)
        values.update({f"data/skipped_{k}": v for k, v in self._skipped().items()})
        self.log.scalars(step, values)

    def _skipped(self) -> dict[str, int]:
        """Corrupt samples and unreadable shard reads skipped by all ranks since the run began (a collective): the
        totals saved with the resumed checkpoint plus what this launch's loaders counted."""
        counts = dist.gather_objects((skipped_samples(), skipped_shards()))  # since each rank's process started
        now = {"samples": sum(c[0] for c in counts), "shards": sum(c[1] for c in counts)}
        return {k: self.skipped_before.get(k, 0) + v for k, v in now.items()}

    def _maybe_evaluate(self) -> bool:
        """Evaluate at the end of every ``eval.every``-th epoch and of the last one."""
        step, s, every = self.state.step, self.schedule, self.recipe.eval.every
        if not s.ends_epoch(step) or not (step == s.total_steps or (every and s.epoch_of(step) % every == 0)):
            return False
        self._check_finite()
        self._status("eval")
        cast = lambda images: images.to(self.engine.device, dtype=self.dtype, non_blocking=True)  # noqa: E731
        self.engine.eval()
        result = evaluate(self.task, self.engine, self.engine.module, self.recipe, self.remote, cast)
        self.engine.train()
        metric, mode = self.task.best_metric
        value = result.metrics.get(metric)
        best = self.state.better(metric, value, mode)
        if best:
            self.state.best = Best(metric, value, step, checkpoint.step_tag(step))
        record = {"step": step, "epoch": step / s.steps_per_epoch, **result.metrics}
        save_evaluation(self.output, step, record, result, self.log, best=best)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
        self.log.message(f"eval at step {step}: {summary}")
        self._status("train")
        return True

    def _save_for_outage(self, exc: DataSourceOutage) -> DataSourceOutage:
        """Save the last completed step (unless saved already) before the run stops; the error says how to go on."""
        step = self.state.step
        if step > 0 and self.state.last_saved != step:
            self._save()
        self._status("stopped")
        saved = f"saved a checkpoint at step {step}" if step > 0 else "no step was completed"
        return DataSourceOutage(f"{exc}. The run stopped: {saved} in {self.output}; when the source is back, continue "
                                "with --resume auto (data.retries and data.timeout_s may be raised on resume)")

    def _save(self) -> None:
        self._check_finite()  # never a checkpoint of non-finite weights
        self._status("save")
        self.state.stream = self._position(self.state.step).without_rank()
        self.state.skipped = self._skipped()
        self.state.data_sha256 = self.data_sha256
        self.checkpoints.save(self.engine, self.state, recipe_to_dict(self.recipe))
        self._status("train")
