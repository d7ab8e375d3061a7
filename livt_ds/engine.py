"""One launch of a training stage: `open_run` sets it up, `train` runs it.

`open_run` reads top to bottom: the data set and the batch plan, the run folder's lock, the one resume decision
(made on rank 0, the same on every rank), the run files, the DeepSpeed engine and the restored `TrainState`.
`train` is the loop: the lr, the micro-steps (forward, backward, step), the state's advance, then the log, the
evaluation, the checkpoint and the stop as they come due. What differs between the stages lives in the task
(tasks.py); what a checkpoint holds, in checkpoint.py; where the run stands, in `TrainState` alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livt_ds import checkpoint, dist, provenance
from livt_ds.checkpoint import ResumePlan
from livt_ds.config import Recipe, load_ds_config, recipe_to_dict, resolve_ds_config
from livt_ds.cuda_arch import set_plain_cuda_arch_list
from livt_ds.data.pipeline import StreamPosition, skipped_samples, skipped_shards, train_loader
from livt_ds.data.remote import RemoteOptions
from livt_ds.data.shards import load_meta, meta_digest
from livt_ds.errors import DataSourceOutage, NonFiniteLossError
from livt_ds.evaluate import evaluate, evaluate_test_once, save_evaluation
from livt_ds.optim import apply_lr, param_groups
from livt_ds.run_files import write_run_files, write_status
from livt_ds.run_log import Logger
from livt_ds.seeding import seed_everything
from livt_ds.step_feed import step_batches
from livt_ds.tasks import Task, build_task
from livt_ds.train_state import Schedule, TrainState
from livt_ds.weights import initial_model


@dataclass(frozen=True)
class Run:
    """What one launch trains with, fixed once `open_run` returns. ``end``: the step this launch stops at (the
    schedule's end, or ``train.stop_after_steps``)."""

    stage: str
    recipe: Recipe
    output: Path
    world: int
    schedule: Schedule
    end: int
    task: Task
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    dtype: torch.dtype  # of the model's inputs: the engine's precision
    remote: RemoteOptions
    plan: ResumePlan | None
    log: Logger
    lock: provenance.RunLock | None  # held by rank 0

    def position(self, step: int) -> StreamPosition:
        """The data stream right after optimizer step ``step``, for this rank."""
        return self.schedule.stream_position(step, seed=self.recipe.train.seed, rank=dist.rank(), world=self.world,
                                             workers=self.recipe.data.num_workers)

    def status(self, phase: str, step: int) -> None:
        if dist.is_main():
            write_status(self.output, phase, step)

    def close(self) -> None:
        self.log.close()
        if self.lock is not None:
            self.lock.release()


def open_run(stage: str, recipe: Recipe, ds_config_path: str, output: str | Path, resume: str = "auto", *,
             allow_recipe_change: bool = False, overwrite: bool = False) -> tuple[Run, TrainState]:
    """Set up one launch of ``stage`` in the run folder ``output`` (a collective); `Run.close` releases it.

    ``resume``: "auto" (the folder's latest checkpoint, if any), "none" or a checkpoint path (checkpoint.py);
    ``overwrite`` (with "none"): the earlier run's outputs in ``output`` are deleted first (history.jsonl stays)."""
    output, world = Path(output), dist.world_size()
    remote = RemoteOptions.from_config(recipe.data)
    meta = load_meta(recipe.data.path, remote)
    ds_config = resolve_ds_config(load_ds_config(ds_config_path), recipe, world)
    task = build_task(stage, recipe, meta)
    schedule = Schedule.plan(recipe, ds_config, meta["splits"][recipe.data.train_split]["num_samples"])
    data_sha256 = meta_digest(meta)  # a resume may read another copy of the same set
    stop_after = recipe.train.stop_after_steps
    end = schedule.total_steps if stop_after is None else min(schedule.total_steps, stop_after)

    lock = provenance.RunLock(output) if dist.is_main() else None
    dist.on_main(lambda: bool(lock.acquire()))  # every rank fails together when a live run holds the folder
    try:
        plan = checkpoint.agree_on_resume(output, resume, world, overwrite=overwrite, recipe=recipe,
                                          schedule=schedule, allow_recipe_change=allow_recipe_change,
                                          data_sha256=data_sha256)
        if overwrite:
            deleted = dist.on_main(lambda: provenance.discard_run_outputs(output))
            if deleted and dist.is_main():
                print(f"[livt] --overwrite: deleted {', '.join(deleted)} of the earlier run in {output}", flush=True)
        if dist.is_main():
            write_run_files(output, recipe, ds_config, {"stage": stage, "world_size": world,
                                                        "num_classes": meta.get("num_classes"),
                                                        "data": recipe.data.path, "schedule": schedule.as_dict()})
        dist.barrier()
        engine, optimizer, dtype = build_engine(task, recipe, checkpoint.engine_config(plan, ds_config))
        seed_everything(recipe.train.seed * 1000 + dist.rank())  # distinct masks / drop-path per rank
        state = checkpoint.restore(engine, plan, stage) if plan else TrainState(stage)
        state.data_sha256 = data_sha256
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    log = Logger(output, tensorboard=recipe.log.tensorboard, progress=recipe.log.progress,
                 total_steps=schedule.total_steps, start_step=state.step)
    for text in plan.messages() if plan else []:
        log.message(text)
    log.message(f"{stage}: {schedule.total_steps} steps ({recipe.train.epochs} epochs x {schedule.steps_per_epoch}),"
                f" batch {schedule.global_batch} = {ds_config['train_micro_batch_size_per_gpu']} x "
                f"{schedule.accumulation} x {world} ranks, lr {schedule.base_lr:.3g}, output {output}")
    return Run(stage, recipe, output, world, schedule, end, task, engine, optimizer, dtype, remote, plan, log,
               lock), state


def import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with dynamo off, so its ``torch.compile`` decorators leave the
    functions as they are. DeepSpeed's ZeRO and bf16 optimizers import that module (for an ``isinstance`` check)
    even when the optimizer is AdamW, and compiling its three kernels at import loads Inductor: about 1 s of CPU in
    every rank's start-up, for an optimizer this run does not use. Called only when the DeepSpeed config's optimizer
    is not Muon."""
    if "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules:
        return
    previous = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # read by torch.compile when it decorates, not when the function runs
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        if previous is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous


def build_engine(task: Task, recipe: Recipe, ds_config: dict[str, Any]):
    """The task's model in a DeepSpeed engine with the optimizer from the JSON and the recipe's param groups.
    Returns (engine, optimizer, input dtype)."""
    import deepspeed  # here, not at the top: `livt shard`, `predict` and `export` never pay for its import

    seed_everything(recipe.train.seed)  # identical initial weights on every rank
    model = initial_model(task)
    weight_decay = ds_config["optimizer"]["params"].get("weight_decay", 0.0)
    groups = param_groups(model, weight_decay, recipe.train.layer_decay)
    set_plain_cuda_arch_list()  # before DeepSpeed builds an op: it cannot parse torch's "9.0a"
    if "muon" not in str(ds_config["optimizer"].get("type", "")).lower():
        import_muon_uncompiled()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else (torch.float16 if engine.fp16_enabled() else torch.float32)
    return engine, optimizer, dtype


def train(run: Run, state: TrainState) -> TrainState:
    """Train from ``state`` to the launch's end (or a SIGTERM: then a checkpoint); returns the state reached."""
    recipe, schedule, engine, task = run.recipe, run.schedule, run.engine, run.task
    window = LossWindow(engine.device, schedule.accumulation)
    with launch_record(run, state, window) as sigterm:
        with contextlib.closing(step_batches(micro_batches(run, state.step), schedule.accumulation)) as batches:
            engine.train()
            while state.step < run.end:
                apply_lr(run.optimizer, schedule.lr(state.step))
                task.set_epoch(schedule.epoch_of(state.step))
                for _ in range(schedule.accumulation):
                    images, labels = next(batches)
                    images, targets = task.prepare_batch(images.to(engine.device, non_blocking=True),
                                                         labels.to(engine.device, non_blocking=True))
                    loss = task.loss(engine, images.to(run.dtype), targets)  # forward
                    engine.backward(loss)
                    engine.step()  # the optimizer steps at the last micro-batch of the accumulation
                    window.add(loss, state.step)
                state.advance(run.position(state.step + 1))
                run.log.advance()
                step = state.step
                if step % recipe.log.every_steps == 0 or step == run.end:
                    log_training(run, state, window)
                evaluated = schedule.evaluation_due(step, recipe.eval.every)
                if evaluated:
                    evaluate_and_keep_best(run, state, window)
                stop = dist.any_rank(sigterm.is_set())  # SIGTERM reached some rank: every rank stops here
                if checkpoint.save_due(recipe.checkpoint, step, evaluated=evaluated, final=stop or step >= run.end):
                    save(run, state, window)
                if stop:
                    sigterm.set()
                    run.log.message(f"SIGTERM: saved a checkpoint at step {step}; continue with --resume auto")
                    break
        evaluate_test_once(task, run.output, run.remote, state, run.log, bf16=run.dtype == torch.bfloat16,
                           finished=state.step >= schedule.total_steps)
    return state


def micro_batches(run: Run, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training micro-batches of this rank from optimizer step ``step`` to the end of training: one loader, whose
    workers start once and run the epochs back to back."""
    yield from train_loader(run.recipe.data.path, run.position(step), epochs=run.recipe.train.epochs,
                            split=run.recipe.data.train_split, transform=run.task.train_transform(),
                            batch_size=run.engine.train_micro_batch_size_per_gpu(),
                            pin_memory=torch.cuda.is_available(), remote=run.remote)


def log_training(run: Run, state: TrainState, window: LossWindow) -> None:
    """The mean loss over ranks since the last log line, the lr, the throughput, the grad norm, the skipped data."""
    window.check_finite(state, run.stage)
    step, schedule = state.step, run.schedule
    loss, steps, seconds = window.take()
    values = {"loss": float(dist.all_reduce_mean(loss).item()), "lr": schedule.lr(step - 1),
              "images_per_s": steps * schedule.global_batch / max(seconds, 1e-9),
              "epoch": step / schedule.steps_per_epoch}
    norm = run.engine.get_global_grad_norm()
    if norm is not None:
        values["grad_norm"] = float(norm)
    values.update({f"data/skipped_{k}": v for k, v in state.count_skipped(skipped_this_launch()).items()})
    run.log.scalars(step, values)


def evaluate_and_keep_best(run: Run, state: TrainState, window: LossWindow) -> None:
    """Evaluate the task on the validation split; the state keeps the best evaluation."""
    window.check_finite(state, run.stage)
    step, engine = state.step, run.engine
    run.status("eval", step)
    engine.eval()
    result = evaluate(run.task, engine, engine.module, run.recipe, run.remote,
                      lambda images: images.to(engine.device, dtype=run.dtype, non_blocking=True))
    engine.train()
    metric, mode = run.task.best_metric
    best = state.record_evaluation(metric, result.metrics.get(metric), mode, checkpoint.step_tag(step))
    record = {"step": step, "epoch": step / run.schedule.steps_per_epoch, **result.metrics}
    save_evaluation(run.output, step, record, result, run.log, best=best)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    run.log.message(f"eval at step {step}: {summary}")
    run.status("train", step)


def save(run: Run, state: TrainState, window: LossWindow) -> None:
    """A checkpoint of the state's step (never of non-finite weights)."""
    window.check_finite(state, run.stage)
    run.status("save", state.step)
    state.count_skipped(skipped_this_launch())
    checkpoint.save(run.engine, state, run.output, keep_last=run.recipe.checkpoint.keep_last,
                    recipe=recipe_to_dict(run.recipe))
    run.status("train", state.step)


def save_for_outage(run: Run, state: TrainState, window: LossWindow, exc: DataSourceOutage) -> DataSourceOutage:
    """Save the last completed step (unless saved already) before the run stops; the error says how to go on."""
    step = state.step
    if step > 0 and state.last_saved != step:
        save(run, state, window)
    run.status("stopped", step)
    saved = f"saved a checkpoint at step {step}" if step > 0 else "no step was completed"
    return DataSourceOutage(f"{exc}. The run stopped: {saved} in {run.output}; when the source is back, continue "
                            "with --resume auto (data.retries and data.timeout_s may be raised on resume)")


def skipped_this_launch() -> dict[str, int]:
    """Corrupt samples and unreadable shard reads this launch's loaders skipped on all ranks (a collective)."""
    shards = skipped_shards()  # before the samples: a skipped shard read counts its sample first (CountedSkip)
    counts = dist.gather_objects((skipped_samples(), shards))
    return {"samples": sum(c[0] for c in counts), "shards": sum(c[1] for c in counts)}


@contextlib.contextmanager
def launch_record(run: Run, state: TrainState, window: LossWindow) -> Iterator[threading.Event]:
    """Around the loop: a SIGTERM flag (set by the handler, read by the loop), ``status.json``'s phase, the launch's
    ``history.jsonl`` segment with the reason it ended, and the checkpoint of a data source outage."""
    sigterm = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sigterm.set())
    signal.siginterrupt(signal.SIGTERM, False)  # restart interrupted system calls (gloo/nccl sockets)
    hosts = sorted(set(dist.gather_objects(socket.gethostname())))
    segment = None
    if dist.is_main():
        plan = run.plan
        segment = provenance.History(run.output).start(
            stage=run.stage, recipe=recipe_to_dict(run.recipe), start_step=state.step, world_size=run.world,
            hosts=hosts, resumed_from=str(plan.tag_dir) if plan else None, diff=plan.recipe_change if plan else None,
            schedule={**run.schedule.as_dict(), "change": plan.schedule_change if plan else None},
            data_sha256=state.data_sha256)
    reason = "error"
    try:
        run.status("train", state.step)
        yield sigterm
        reason = ("sigterm" if sigterm.is_set() else "finished" if state.step >= run.schedule.total_steps
                  else "stop_after_steps")
        run.status("finished" if reason == "finished" else "stopped", state.step)
    except DataSourceOutage as exc:  # every rank is here, at the same step boundary (step_feed.py)
        reason = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        raise save_for_outage(run, state, window, exc) from None
    except BaseException as exc:
        reason = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        run.status("failed", state.step)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if segment is not None:
            provenance.History(run.output).end(segment, end_step=state.step, reason=reason)


class LossWindow:
    """The training loss since the last log line and the first non-finite step, kept on the device: one host
    sync per log line, none per step."""

    def __init__(self, device: torch.device, accumulation: int) -> None:
        self.accumulation = accumulation
        self.total = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.micro_batches, self.start = 0, time.time()
        self.finite_through = -1  # the losses of every step up to this one were checked finite on all ranks

    def add(self, loss: torch.Tensor, step: int) -> None:
        """The loss of a micro-batch of optimizer step ``step`` (0-based)."""
        loss = loss.detach().float()
        self.total += loss
        self.micro_batches += 1
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad,
                                     torch.full_like(self.first_bad, step + 1))

    def check_finite(self, state: TrainState, stage: str) -> None:
        """Raise NonFiniteLossError when a loss up to ``state.step`` was not finite on any rank (a collective and a
        host sync: once per step at most, however many of log, evaluation and save meet at it)."""
        if self.finite_through == state.step:
            return
        bad = int(self.first_bad.item())
        first = min(dist.gather_objects(bad if bad >= 0 else 10**12))
        if first < 10**12:
            saved = state.last_saved
            raise NonFiniteLossError(
                f"the loss became non-finite at optimizer step {first} (stage {stage}); no checkpoint was written "
                f"at or after it (latest: {saved if saved is not None else 'none'}). Lower train.blr, "
                "check the data, or enable gradient_clipping in the DeepSpeed config.")
        self.finite_through = state.step

    def take(self) -> tuple[torch.Tensor, int, float]:
        """(mean loss on this rank, optimizer steps, seconds) since the last call; starts a new window."""
        mean = self.total / max(self.micro_batches, 1)
        steps, seconds = self.micro_batches // self.accumulation, time.time() - self.start
        self.total = torch.zeros_like(self.total)
        self.micro_batches, self.start = 0, time.time()
        return mean, steps, seconds
