"""The run folder: the name of every file livt writes there, and how they are written.

```
RUN/config.yaml          the resolved recipe            RUN/metrics.jsonl      training scalars, one line per log
RUN/ds_config.json       the resolved DeepSpeed config  RUN/metrics.json       the latest evaluation
RUN/run.yaml             stage, world size, schedule    RUN/best_metrics.json  the best evaluation
RUN/status.json          the phase (below)              RUN/plots/             evaluation images
RUN/history.jsonl        one line per launch start/end  RUN/run.lock           held by the live launch
RUN/checkpoints/<tag>/   ZeRO files + train_state.json  RUN/checkpoints/latest the newest complete tag
RUN/export/              model.safetensors + config.json
RUN/evals/<time>/        livt eval of this run
RUN/test_metrics.json    the test split, read once at the end
```

Files other processes read while the run goes on are replaced atomically (:func:`write_text_atomic`): a reader, or
a process killed at any moment, sees the old or the new file, never a partial one.

``status.json`` holds ``{"phase": "setup" | "train" | "eval" | "save" | "finished" | "stopped" | "failed",
"step": int, "pid": int, "time": float}`` (``step``: the last completed optimizer step), rewritten by global rank 0
at every phase change, never in the middle of one. A run killed without warning leaves the phase it was in, which
tells a run that died while saving from one that died while training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from livt_ds.config import Recipe, save_recipe

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
RUN_INFO = "run.yaml"
STATUS = "status.json"
HISTORY = "history.jsonl"
LOCK = "run.lock"
METRICS_LOG = "metrics.jsonl"
EVAL_METRICS = "metrics.json"
BEST_METRICS = "best_metrics.json"
TEST_METRICS = "test_metrics.json"  # the test split, read once at the end of a fine-tuning run
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # in CHECKPOINTS
STATE_FILE = "train_state.json"  # in a tag folder: the training state, and the mark of a complete save
EXPORT = "export"
EVALS = "evals"  # livt eval of a training run: one folder per evaluation
TENSORBOARD = "tensorboard"

# What a training launch writes into its run folder (``--resume none --overwrite`` deletes these; history.jsonl stays)
RUN_OUTPUTS = (CHECKPOINTS, EXPORT, EVALS, TENSORBOARD, PLOTS, METRICS_LOG, EVAL_METRICS, BEST_METRICS, TEST_METRICS,
               STATUS, CONFIG, DS_CONFIG, RUN_INFO)

PHASES = ("setup", "train", "eval", "save", "finished", "stopped", "failed")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a sibling temp file, then rename it over ``path``."""
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
    write_json_atomic(Path(run_dir) / STATUS, {"phase": phase, "step": int(step), "pid": os.getpid(),
                                               "time": time.time()})


def write_run_files(run_dir: Path, recipe: Recipe, ds_config: dict[str, Any], info: dict[str, Any]) -> None:
    """A launch's resolved recipe, DeepSpeed config and ``info`` (stage, world size, schedule); phase ``setup``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_status(run_dir, "setup", 0)
    save_recipe(recipe, run_dir / CONFIG)
    (run_dir / DS_CONFIG).write_text(json.dumps(ds_config, indent=2))
    (run_dir / RUN_INFO).write_text(yaml.safe_dump(info, sort_keys=False))
