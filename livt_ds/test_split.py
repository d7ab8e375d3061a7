"""The test split, read once: which split it is (its one evaluation at the end of a fine-tuning run is
`livt_ds.evaluate.evaluate_test_once`).

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

from typing import Any

from livt_ds.config import Recipe
from livt_ds.errors import ConfigError

__all__ = ["AUTO", "resolve_test_split"]

AUTO = "auto"


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
