"""The test split, read once: which split it is, and its one evaluation at the end of a fine-tuning run.

Evaluations during training read ``data.eval_split`` (val) only, and the best checkpoint is chosen there. When the
run finishes, `evaluate_test_once` evaluates two checkpoints on ``data.test_split``: the one chosen on val
(``best_on_val``) and the last one (``last``), and writes ``RUN/test_metrics.json``
``{"split", "best_on_val": {...}, "last": {...}}`` (each: top-1, many / medium / few, ECE, per-class accuracy,
num_samples, ... and the checkpoint tag). Both are consolidated fp32 weights run as a plain module, the path of
`livt eval`, so the two numbers are measured alike. A run that already holds the numbers of its last checkpoint does
not read test again (a resume of a finished run).

``data.test_split``: ``auto`` (default) takes the shard set's ``meta.json`` ``test_split`` (``test`` when the set
has a test split; ``val`` where the data set's val is its test set, iNat18; none when it has neither), ``null``
turns the test evaluation off, a split name picks that split.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from livt_ds import dist
from livt_ds.checkpoint import checkpoint_dir, step_tag
from livt_ds.config import ConfigError, Recipe
from livt_ds.train_state import TrainState, write_json_atomic, write_status

__all__ = ["AUTO", "TEST_METRICS_NAME", "resolve_test_split", "evaluate_test_once", "test_summary"]

AUTO = "auto"
TEST_METRICS_NAME = "test_metrics.json"
SHOWN = ("top1", "many", "medium", "few", "ece")


def resolve_test_split(recipe: Recipe, meta: dict[str, Any]) -> str | None:
    """The split the end-of-run test evaluation reads (None: none). Refuses a test split that is missing, and one
    that is also ``data.eval_split`` unless meta.json says the data set's val is its test set."""
    splits = meta.get("splits", {})
    wanted = recipe.data.test_split
    declared = meta.get("test_split", "test" if "test" in splits else None)
    split = declared if wanted == AUTO else wanted
    if split is None:
        return None
    if split not in splits:
        raise ConfigError(f"data.test_split={split!r}: the shard set {recipe.data.path} has no such split (its splits: "
                          f"{sorted(splits)}); shard the test list (make_shards --test-list, ROOT/test) or set "
                          "data.test_split=null")
    val_is_test = split == declared and declared != "test"  # the data set has no separate test set (iNat18)
    if split == recipe.data.eval_split and not val_is_test:
        raise ConfigError(f"data.eval_split={split!r} is also the test split: the best checkpoint would be chosen on "
                          "test. Evaluate on val during training (make_shards --val-list, ROOT/val, --val-per-class) "
                          "and evaluate a checkpoint on test with `livt eval --split test`, or set "
                          "data.test_split=null")
    return split


def _metrics_path(output: Path) -> Path:
    return output / TEST_METRICS_NAME


def _already_read(output: Path, last_tag: str) -> bool:
    path = _metrics_path(output)
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("last", {}).get("checkpoint") == last_tag
    except (json.JSONDecodeError, AttributeError):
        return False


def _checkpoint_metrics(task, recipe: Recipe, tag_dir: Path, split: str, remote, bf16: bool) -> dict[str, Any]:
    """Metrics of the checkpoint ``tag_dir`` on ``split``: its fp32 weights in a plain module on every rank."""
    from livt_ds.evaluate import evaluate
    from livt_ds.tasks import FinetuneTask

    loaded = FinetuneTask(dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, init=str(tag_dir))),
                          task.meta)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = loaded.build_model().to(device).eval()

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else nullcontext():
            return model(images)

    result = evaluate(loaded, forward, model, recipe, remote, lambda x: x.to(device, non_blocking=True), split=split)
    return result.metrics


def evaluate_test_once(task, recipe: Recipe, output: str | Path, remote, state: TrainState, log, *,
                       finished: bool) -> dict[str, Any] | None:
    """At the end of a finished fine-tuning run (every rank calls it): the checkpoint chosen on val
    (``state.best``) and the last one (``state.step``, saved at the end), each evaluated once on the test split ->
    ``RUN/test_metrics.json``, the log and the console.

    Does nothing for an MGP run, a run that stopped early, a set without a test split or a test already read."""
    split = getattr(task, "test_split", None)
    output = Path(output)
    last_tag, best_tag = step_tag(state.step), state.best.tag if state.best else None
    if not finished or split is None or _already_read(output, last_tag):
        return None
    if dist.is_main():
        write_status(output, "eval", state.step)
    ds_config = output / "ds_config.json"
    bf16 = ds_config.is_file() and bool(json.loads(ds_config.read_text()).get("bf16", {}).get("enabled"))
    ckpt = checkpoint_dir(output)
    last = _checkpoint_metrics(task, recipe, ckpt / last_tag, split, remote, bf16)
    best_tag = best_tag or last_tag
    best = last if best_tag == last_tag else _checkpoint_metrics(task, recipe, ckpt / best_tag, split, remote, bf16)
    record = {"split": split, "eval_split": recipe.data.eval_split,
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
