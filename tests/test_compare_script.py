"""`make compare` (scripts/compare_losses.sh) knows the new losses: its dry run prints BFT commands whose overrides
make valid recipes (LDAM on hard labels), and unknown names are refused."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from livt_ds.config import load_recipe

NEW = ("focal", "cb_ce", "cb_focal", "ldam")


def _script(**env: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["bash", "scripts/compare_losses.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": path, "DS_ACCELERATOR": "cpu", **env})


def test_dry_run_commands_make_valid_recipes_for_the_new_losses() -> None:
    result = _script(COMPARE_DRY_RUN="1", COMPARE_SEEDS="2", COMPARE_LOSSES=" ".join(NEW))
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("livt finetune")]
    assert len(commands) == 2 * len(NEW)
    seen = set()
    for argv in commands:
        config = argv[argv.index("--config") + 1]
        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        recipe = load_recipe(REPO / config, overrides)  # refuses ldam with soft targets
        seen.add((recipe.loss.name, recipe.train.seed))
        assert argv[argv.index("--output") + 1] == f"runs/compare/{recipe.loss.name}/seed{recipe.train.seed}"
    assert seen == {(name, seed) for name in NEW for seed in (0, 1)}


def test_unknown_loss_name_is_refused() -> None:
    result = _script(COMPARE_DRY_RUN="1", COMPARE_LOSSES="ldam poly")
    assert result.returncode != 0
    assert "unknown 'poly'" in result.stderr and "ldam" in result.stderr
