"""The one evaluation path, used by the trainer (every ``eval.every`` epochs) and by `livt eval`.

`evaluate` runs a task's evaluation over the eval split on every rank (the caller's RNG streams untouched);
`save_evaluation` writes what it found into a folder (``metrics.json``, ``best_metrics.json``, ``plots/``) and the
run's log (metrics.jsonl, TensorBoard). `run_eval` is `livt eval`: a BFT model (run folder, checkpoint or export)
consolidated to fp32 and run as a plain module (`evaluate_weights`; built by weights.load_classifier, as for
`livt predict`), bf16 autocast on GPU when the DeepSpeed config enables bf16.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from livt_ds import dist
from livt_ds.checkpoint import checkpoint_dir, step_tag
from livt_ds.config import Recipe, load_ds_config, save_recipe
from livt_ds.data.pipeline import eval_loader
from livt_ds.data.remote import RemoteOptions
from livt_ds.data.shards import load_meta
from livt_ds.errors import ConfigError, IncompleteEvaluationError
from livt_ds.hub import hub_config
from livt_ds.model_record import follow_record, model_record, resolve_model
from livt_ds.report import save_images
from livt_ds.run_files import (
    BEST_METRICS,
    CHECKPOINTS,
    CONFIG,
    EVAL_METRICS,
    EVALS,
    HISTORY,
    PLOTS,
    RUN_INFO,
    TEST_METRICS,
    write_json_atomic,
    write_status,
)
from livt_ds.run_log import Logger
from livt_ds.tasks import EvalResult, FinetuneTask, Task
from livt_ds.train_state import TrainState
from livt_ds.weights import load_classifier, weights_provenance

logger = logging.getLogger(__name__)


def evaluate(task: Task, forward: Callable, model: torch.nn.Module, recipe: Recipe, remote: RemoteOptions,
             cast: Callable[[torch.Tensor], torch.Tensor], split: str | None = None) -> EvalResult:
    """``task.evaluate`` over ``split`` (default ``recipe.data.eval_split``), sharded over the ranks (a collective)."""
    loader = _kept_loader(task, recipe, remote, split or recipe.data.eval_split)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        result = task.evaluate(forward, model, loader, cast)
    shortfall = check_complete(loader.dataset, result.metrics.get("num_samples"), split or recipe.data.eval_split)
    if shortfall:  # recorded with the metrics (metrics.json; eval/missing_samples in the log), and warned about
        result.metrics["incomplete"] = shortfall
        result.metrics["missing_samples"] = shortfall["expected"] - shortfall["scored"]
        if dist.is_main():
            logger.warning("partial evaluation: %s", shortfall["message"])
    return result


def check_complete(stream: Any, scored: int | None, split: str) -> dict[str, Any] | None:
    """None when every sample of the split was scored, else what is missing: the shards read short (summed over
    the ranks, a collective) with their counts, and a message naming them."""
    read = [sum(c) for c in zip(*dist.gather_objects(stream.tally.values()))]
    expected = sum(stream.shard_sizes)
    short = {url.rsplit("/", 1)[-1]: [got, want] for url, got, want in zip(stream.urls, read, stream.shard_sizes)
             if got < want}
    scored = sum(read) if scored is None else int(scored)
    if scored >= expected and not short:
        return None
    causes = [f"{name} gave {got} of its {want} samples" for name, (got, want) in short.items()]
    if sum(read) > scored:
        causes.append(f"{sum(read) - scored} corrupt samples skipped")
    message = (f"{split}: scored {scored} of its {expected} samples ({'; '.join(causes)}): the shards are "
               "truncated, damaged or unreadable; check the set with scripts/make_shards.py --verify DATA_PATH")
    return {"scored": scored, "expected": expected, "short_shards": short, "message": message}


_kept: tuple | None = None  # (key, task, loader) of the last evaluation: its workers wait for the next one


def _kept_loader(task: Task, recipe: Recipe, remote: RemoteOptions, split: str):
    """The eval loader of ``task`` on ``split``, the same one as last time when nothing changed (its workers stay)."""
    global _kept
    key = (recipe.data.path, split, recipe.eval.batch_size, recipe.data.num_workers, dist.rank(), dist.world_size(),
           remote)
    if _kept is None or _kept[0] != key or _kept[1] is not task:
        _kept = None  # the previous loader's workers end before new ones start
        loader = eval_loader(recipe.data.path, split=split, transform=task.eval_transform(),
                             batch_size=recipe.eval.batch_size, num_workers=recipe.data.num_workers,
                             rank=dist.rank(), world_size=dist.world_size(), remote=remote, persistent=True)
        _kept = (key, task, loader)
    _kept[2].dataset.tally.reset()  # samples read per shard count from this pass on
    return _kept[2]


def save_evaluation(output: Path, step: int, record: dict[str, Any], result: EvalResult, log: Logger, *,
                    best: bool = False) -> None:
    """``record`` (the metrics, with any step / epoch / provenance) to ``metrics.json`` (and ``best_metrics.json``
    when ``best``), the images to ``plots/``, the scalars and images to the log; rank 0 writes."""
    log.scalars(step, {k: v for k, v in result.metrics.items() if not isinstance(v, (list, dict))}, prefix="eval/")
    log.images(step, result.images)
    if not dist.is_main():
        return
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / EVAL_METRICS, record)  # a reader (or livt export) never sees half a file
    if best:
        write_json_atomic(output / BEST_METRICS, record)
    save_images(result.images, output / PLOTS, step)


def is_training_run(folder: Path) -> bool:
    """A folder a training launch made (its files are training's alone)."""
    return any((folder / name).exists() for name in (CHECKPOINTS, HISTORY, RUN_INFO))


def eval_folder(output: Path) -> Path:
    """Where `livt eval --output OUTPUT` writes: OUTPUT itself, or for a training run ``OUTPUT/evals/<time>/``, so
    that an evaluation never rewrites a run's config.yaml, metrics or logs (rank 0's choice, on every rank)."""
    folder = output
    if dist.is_main() and is_training_run(output):
        folder = output / EVALS / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while folder.exists():
            folder, n = output / EVALS / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    return Path(dist.broadcast_object(str(folder)))


def evaluate_weights(task: FinetuneTask, weights: str | Path, remote: RemoteOptions, split: str,
                     bf16: bool) -> EvalResult:
    """`evaluate` of the classifier at ``weights`` (a run, checkpoint or export), built as the task's recipe
    describes it by `load_classifier`: a plain fp32 module on every rank, no optimizer, no ZeRO, under bf16 autocast
    on the GPU when ``bf16``."""
    config = hub_config(task.recipe, "finetune", task.meta["classes"], task.class_counts, task.mean, task.std)
    model, _ = load_classifier(weights, config)
    device = next(model.parameters()).device
    autocast = bf16 and device.type == "cuda"

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext():
            return model(images)

    return evaluate(task, forward, model, task.recipe, remote, lambda x: x.to(device, non_blocking=True), split=split)


def run_eval(recipe: Recipe, ds_config_path: str, output: str | Path, split: str | None = None) -> dict[str, Any]:
    """`livt eval`: the model of ``model.init`` on ``split`` (default ``data.eval_split``; ``test`` reads the test
    split) -> metrics.json in `eval_folder` (returned as ``metrics["output"]``). The test-prior adjustment follows the
    model's own training record (model_record.py)."""
    if not recipe.model.init:
        raise ConfigError("livt eval needs model.init=RUN_OR_EXPORT (a BFT run folder, checkpoint or export .pt)")
    output = eval_folder(Path(output))
    remote = RemoteOptions.from_config(recipe.data)
    meta = load_meta(recipe.data.path, remote)
    split = split or recipe.data.eval_split
    if split not in meta.get("splits", {}):
        declared = meta.get("test_split")
        hint = f"; its test set is the split '{declared}' (meta.json test_split)" if declared else ""
        raise ConfigError(f"--split {split}: the shard set {recipe.data.path} has no such split (its splits: "
                          f"{sorted(meta.get('splits', {}))}){hint}")
    record = model_record(resolve_model(recipe.model.init), fallback_meta=meta)
    recipe, trained_with, class_counts, notes = follow_record(recipe, record, meta, recipe.model.init)
    if dist.is_main():
        for note in notes:
            print(f"[livt] {note}", flush=True)
    task = FinetuneTask(recipe, meta, class_counts=class_counts, trained_with=trained_with)
    bf16 = bool(load_ds_config(ds_config_path).get("bf16", {}).get("enabled"))
    result = evaluate_weights(task, recipe.model.init, remote, split, bf16)
    if "incomplete" in result.metrics:  # a score over part of the split is no score of the split
        raise IncompleteEvaluationError(f"livt eval on {recipe.data.path}: {result.metrics['incomplete']['message']}")
    result.metrics["split"] = split
    result.metrics["provenance"] = weights_provenance(recipe.model.init) if dist.is_main() else None
    result.metrics["test_prior_loss"]["source"] = record.source if record else "--config"
    result.metrics["notes"] = notes
    if dist.is_main():
        output.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, output / CONFIG)
    log = Logger(output, tensorboard=True, progress=False)
    try:
        save_evaluation(output, 0, result.metrics, result, log)
    finally:
        log.close()
    return {**result.metrics, "output": str(output)}


# ---------------------------------------------------------------------------------------------- the test split, once
SHOWN = ("top1", "many", "medium", "few", "ece")


def _metrics_path(output: Path) -> Path:
    return output / TEST_METRICS


def _already_read(output: Path, last_tag: str) -> bool:
    path = _metrics_path(output)
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("last", {}).get("checkpoint") == last_tag
    except (json.JSONDecodeError, AttributeError):
        return False


def evaluate_test_once(task: Task, output: str | Path, remote: RemoteOptions, state: TrainState, log: Logger, *,
                       bf16: bool, finished: bool) -> dict[str, Any] | None:
    """At the end of a finished fine-tuning run (every rank calls it): the checkpoint chosen on val
    (``state.best``) and the last one (``state.step``, saved at the end), each evaluated once on the test split ->
    ``RUN/test_metrics.json``, the log and the console; under bf16 autocast on the GPU when ``bf16`` (the run's
    precision).

    Does nothing for an MGP run, a run that stopped early, a set without a test split or a test already read."""
    split = getattr(task, "test_split", None)
    output = Path(output)
    last_tag, best_tag = step_tag(state.step), state.best.tag if state.best else None
    if not finished or split is None or _already_read(output, last_tag):
        return None
    if dist.is_main():
        write_status(output, "eval", state.step)
    ckpt = checkpoint_dir(output)
    last = evaluate_weights(task, ckpt / last_tag, remote, split, bf16).metrics
    best_tag = best_tag or last_tag
    best = last if best_tag == last_tag else evaluate_weights(task, ckpt / best_tag, remote, split, bf16).metrics
    record = {"split": split, "eval_split": task.recipe.data.eval_split,
              "best_on_val": {"checkpoint": best_tag, **best}, "last": {"checkpoint": last_tag, **last}}
    for name in ("best_on_val", "last"):
        log.scalars(state.step, {k: record[name][k] for k in SHOWN if isinstance(record[name].get(k), float)},
                    prefix=f"test/{name}/")
    if dist.is_main():
        write_json_atomic(_metrics_path(output), record)
    log.message(test_summary(record))
    return record


def test_summary(record: dict[str, Any]) -> str:
    """A header and one line per checkpoint: ``best on val (step00000040): top1 61.2, many ...``."""
    lines = [f"test split '{record['split']}', read once:"]
    for name, label in (("best_on_val", "best on val"), ("last", "last")):
        m = record[name]
        values = ", ".join(f"{k} {m[k]:.4g}" for k in SHOWN if isinstance(m.get(k), (int, float)))
        lines.append(f"  {label} ({m.get('checkpoint')}): {values}, {m.get('num_samples')} images")
    return "\n".join(lines)
