"""The recipes (``configs/*.yaml``) and DeepSpeed configs (``ds_configs/*.json``) shipped inside the package.

They live in ``livt_ds/configs`` and ``livt_ds/ds_configs`` (the repository's top-level ``configs`` and
``ds_configs`` point there), so an installed wheel has them too. ``--config tiny_bft.yaml`` works from any folder:
a name that is not an existing file is looked up among the shipped ones; a path always means that file.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from livt_ds.errors import ConfigError

KINDS = {"recipe": ("configs", ".yaml"), "ds_config": ("ds_configs", ".json")}


def shipped_dir(kind: str) -> Path:
    """The package folder holding the shipped files of ``kind`` ("recipe" or "ds_config")."""
    folder, _ = KINDS[kind]
    return Path(str(resources.files("livt_ds") / folder))


def shipped(kind: str) -> list[Path]:
    """The shipped files of ``kind``, sorted by name."""
    folder, suffix = KINDS[kind]
    return sorted(p for p in shipped_dir(kind).iterdir() if p.suffix == suffix)


def find(kind: str, name: str | Path) -> Path:
    """``name`` itself when it is a file, else the shipped file of that name (``.yaml`` / ``.json`` may be left out).
    A ConfigError lists the shipped names when neither exists."""
    path = Path(name)
    if path.is_file():
        return path
    folder, suffix = KINDS[kind]
    if path.name == str(name):  # a bare name, not a path that is missing
        for candidate in (shipped_dir(kind) / path.name, shipped_dir(kind) / f"{path.name}{suffix}"):
            if candidate.is_file():
                return candidate
    what = "recipe" if kind == "recipe" else "DeepSpeed config"
    names = ", ".join(p.name for p in shipped(kind))
    raise ConfigError(f"{name}: {what} not found, neither as a file nor among the shipped ones ({names}); "
                      "`livt recipes` lists them")


def summary(path: Path) -> str:
    """The first comment line of a shipped file (recipes), or its ZeRO stage and precision (DeepSpeed configs)."""
    text = path.read_text()
    if path.suffix == ".yaml":
        first = next((line for line in text.splitlines() if line.startswith("#")), "")
        return first.lstrip("# ").strip()
    config = json.loads(text)
    zero = config.get("zero_optimization", {})
    offload = "optimizer offload to CPU, " if zero.get("offload_optimizer") else ""
    precision = "bf16" if config.get("bf16", {}).get("enabled") else "fp32"
    return f"ZeRO stage {zero.get('stage', 0)}, {offload}{precision}"
