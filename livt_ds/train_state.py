"""What a run is doing and where it stands: the phase file a monitor (or a test) reads, and atomic JSON writes.

``RUN/status.json`` is rewritten by global rank 0 at every phase change, never in the middle of one:
``{"phase": "setup" | "train" | "eval" | "save" | "finished" | "stopped" | "failed", "step": int, "pid": int,
"time": float}``. ``step`` is the last completed optimizer step. A run killed without warning leaves the phase it
was in, which is how one tells a run that died while saving from one that died while training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

PHASES = ("setup", "train", "eval", "save", "finished", "stopped", "failed")


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON so that a reader (or a process killed at any moment) sees the old or the new file,
    never a partial one: write a sibling temp file, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def write_status(run_dir: Path, phase: str, step: int) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")
    write_json_atomic(Path(run_dir) / "status.json",
                      {"phase": phase, "step": int(step), "pid": os.getpid(), "time": time.time()})
