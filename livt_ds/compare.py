"""`python -m livt_ds.compare RUN... --labels L... --output docs/`: compare finished runs side by side.

Reads each run's ``metrics.json`` (written by training's last evaluation or by ``livt eval``) and writes
``OUTPUT/loss_comparison.md`` (results table, per-class accuracy head -> tail, the recipe settings each run used,
the command), ``OUTPUT/per_class_accuracy.png`` and ``OUTPUT/reliability.png``. The class counts that define
head -> tail order and the many/medium/few groups come from the shard set's ``meta.json``
(``--meta``, else the first run's ``config.yaml`` ``data.path``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from livt_ds import report

__all__ = [
    "RunResult", "load_run", "eval_history", "load_class_info", "comparison_markdown", "write_comparison", "main",
]

MARKDOWN_NAME = "loss_comparison.md"
PER_CLASS_NAME = "per_class_accuracy.png"
RELIABILITY_NAME = "reliability.png"
_REQUIRED_METRICS = ("top1", "many", "medium", "few", "ece", "mce", "per_class", "reliability")
# Recipe keys shown per run in the "settings" table: (column, section, key).
_SETTINGS = (
    ("init", "model", "init"),
    ("model", "model", "name"),
    ("epochs", "train", "epochs"),
    ("batch", "train", "batch_size"),
    ("blr", "train", "blr"),
    ("warm-up", "train", "warmup_epochs"),
    ("loss", "loss", "name"),
    ("tau", "loss", "tau"),
    ("mixup", "augment", "mixup"),
    ("cutmix", "augment", "cutmix"),
    ("smoothing", "augment", "label_smoothing"),
    ("RandAug", "augment", "rand_augment"),
    ("erasing", "augment", "re_prob"),
    ("seed", "train", "seed"),
)


@dataclass(frozen=True)
class RunResult:
    """One run to compare: its folder, metrics.json contents, resolved recipe (empty when absent) and the
    evaluations during training as ``[(epoch, {metric: value})]`` from metrics.jsonl (empty for `livt eval` runs)."""

    path: Path
    metrics: dict[str, Any]
    recipe: dict[str, Any]
    history: list[tuple[float, dict[str, float]]] = field(default_factory=list)


def load_run(path: str | Path) -> RunResult:
    """Read ``RUN/metrics.json`` (``path`` may also be the metrics.json file) and ``RUN/config.yaml`` if present."""
    path = Path(path)
    metrics_path = path if path.suffix == ".json" else path / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: missing; pass a run folder that finished an evaluation "
                                "(finetune with eval, or `livt eval --output RUN`)")
    metrics = json.loads(metrics_path.read_text())
    absent = [key for key in _REQUIRED_METRICS if key not in metrics]
    if absent:
        raise ValueError(f"{metrics_path}: keys {absent} missing; is this a finetune/eval run (not an MGP run)?")
    config_path = metrics_path.parent / "config.yaml"
    recipe = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return RunResult(metrics_path.parent, metrics, recipe or {}, eval_history(metrics_path.parent))


def eval_history(run: str | Path) -> list[tuple[float, dict[str, float]]]:
    """``[(epoch, {"top1": .., "few": .., ...})]`` of the evaluations logged in ``RUN/metrics.jsonl`` during
    training; epochs from ``RUN/run.yaml``'s steps_per_epoch (steps when it is absent)."""
    run = Path(run)
    log = run / "metrics.jsonl"
    if not log.is_file():
        return []
    per_epoch = 1
    if (run / "run.yaml").is_file():
        schedule = (yaml.safe_load((run / "run.yaml").read_text()) or {}).get("schedule", {})
        per_epoch = int(schedule.get("steps_per_epoch") or 1)
    history = []
    for line in log.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "eval/top1" in row:
            values = {k[5:]: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
            history.append((row["step"] / per_epoch, values))
    return history


def _history_lines(runs: Mapping[str, RunResult]) -> list[str]:
    """Markdown table of top-1 / few-shot accuracy at each evaluation during training (how fast each loss gets
    there); empty when no run logged evaluations."""
    tables = {label: dict(run.history) for label, run in runs.items() if run.history}
    if not tables:
        return []
    epochs = sorted({epoch for table in tables.values() for epoch in table})
    lines = ["## During fine-tuning: top-1 / few-shot accuracy (%) at each evaluation", ""]
    lines.append("| epoch | " + " | ".join(tables) + " |")
    lines.append("| ---: |" + " ---: |" * len(tables))
    for epoch in epochs:
        cells = []
        for table in tables.values():
            values = table.get(epoch)
            cells.append("\u2013" if values is None else f"{_pct(values.get('top1'))} / {_pct(values.get('few'))}")
        lines.append(f"| {epoch:g} | " + " | ".join(cells) + " |")
    return lines + [""]


def _pct(value: float | None) -> str:
    return "\u2013" if value is None else f"{float(value):.1f}"


def load_class_info(meta: str | Path) -> tuple[list[int], list[str] | None]:
    """Training images per class and class names from a shard set folder or its ``meta.json``."""
    meta = Path(meta)
    meta_path = meta / "meta.json" if meta.is_dir() else meta
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; pass --meta shards/NAME (the shard set the runs used)")
    data = json.loads(meta_path.read_text())
    if "class_counts" not in data:
        raise ValueError(f"{meta_path}: no 'class_counts'; not a shard set meta.json (scripts/make_shards.py)")
    counts = [int(c) for c in data["class_counts"]]
    names = data.get("classes")
    return counts, [str(n) for n in names] if names and len(names) == len(counts) else None


def _meta_from_runs(runs: Sequence[RunResult]) -> Path:
    for run in runs:
        data_path = run.recipe.get("data", {}).get("path")
        if data_path:
            return Path(data_path)
    raise ValueError("no --meta given and no run's config.yaml names data.path; pass --meta shards/NAME")


def _setting(recipe: Mapping[str, Any], section: str, key: str) -> str:
    value = recipe.get(section, {}).get(key)
    if (section, key) == ("loss", "tau") and not str(recipe.get("loss", {}).get("name", "bal")).startswith("bal"):
        value = None  # tau only scales the balanced losses' bias
    if value is None or value == "":
        return "\u2013"
    return str(value).replace("|", "\\|")


def comparison_markdown(
    runs: Mapping[str, RunResult],
    class_counts: Sequence[int],
    class_names: Sequence[str] | None = None,
    title: str = "Loss comparison",
    notes: Sequence[str] = (),
    command: str = "",
) -> str:
    """The markdown report: results table, per-class accuracy (head -> tail), accuracy during training (when
    logged), settings per run, notes, command."""
    lines = [f"# {title}", "", report.results_table_markdown({k: r.metrics for k, r in runs.items()}).rstrip(), ""]
    lines += ["Top-1 and many (> 100 training images) / medium (20..100) / few (< 20) accuracy, ECE and MCE "
              "(15 bins) in percent, from each run's metrics.json.", ""]
    lines += [f"![per-class accuracy]({PER_CLASS_NAME})", "", "## Per-class accuracy (%), head \u2192 tail", ""]
    order = sorted(range(len(class_counts)), key=lambda i: (-class_counts[i], i))
    labels = list(runs)
    lines.append("| class | train images | " + " | ".join(labels) + " |")
    lines.append("| --- | ---: |" + " ---: |" * len(labels))
    for i in order:
        name = class_names[i] if class_names else str(i)
        cells = []
        for label in labels:
            value = runs[label].metrics["per_class"][i]
            cells.append("\u2013" if value is None else f"{float(value):.0f}")
        lines.append(f"| {name} | {class_counts[i]} | " + " | ".join(cells) + " |")
    lines += ["", f"![reliability diagrams]({RELIABILITY_NAME})", ""] + _history_lines(runs)
    lines += ["## Settings per run", ""]
    lines.append("| label | run | " + " | ".join(col for col, _, _ in _SETTINGS) + " |")
    lines.append("| --- | --- |" + " --- |" * len(_SETTINGS))
    for label, run in runs.items():
        cells = [_setting(run.recipe, section, key) for _, section, key in _SETTINGS]
        lines.append(f"| {label} | `{run.path}` | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    if command:
        lines += ["", "## Command", "", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def write_comparison(
    runs: Mapping[str, RunResult],
    output: str | Path,
    class_counts: Sequence[int],
    class_names: Sequence[str] | None = None,
    title: str = "Loss comparison",
    notes: Sequence[str] = (),
    command: str = "",
    markdown_name: str = MARKDOWN_NAME,
) -> dict[str, Path]:
    """Write the markdown and both PNGs into ``output``; returns {"markdown", "per_class", "reliability"} paths."""
    if not runs:
        raise ValueError("compare: no runs given")
    for label, run in runs.items():
        if len(run.metrics["per_class"]) != len(class_counts):
            raise ValueError(f"compare: run {label!r} ({run.path}) has {len(run.metrics['per_class'])} classes, the "
                             f"shard set's meta.json {len(class_counts)}; pass --meta of the set the runs used")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    per_class = {label: run.metrics["per_class"] for label, run in runs.items()}
    reliability = {
        label: {**run.metrics["reliability"], "ece": run.metrics["ece"], "mce": run.metrics["mce"]}
        for label, run in runs.items()
    }
    paths = {
        "per_class": report.plot_per_class_accuracy(per_class, class_counts, output / PER_CLASS_NAME,
                                                    title=f"{title}: per-class accuracy", class_names=class_names),
        "reliability": report.plot_reliability(reliability, output / RELIABILITY_NAME, title=f"{title}: reliability"),
    }
    markdown = comparison_markdown(runs, class_counts, class_names, title, notes, command)
    paths["markdown"] = output / markdown_name
    paths["markdown"].write_text(markdown)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m livt_ds.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.json (finetune or eval runs)")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the folder names)")
    parser.add_argument("--output", required=True, help="folder for loss_comparison.md and the PNGs (e.g. docs/)")
    parser.add_argument("--meta", default=None,
                        help="shard set folder or meta.json for class counts (default: first run's data.path)")
    parser.add_argument("--title", default="Loss comparison")
    parser.add_argument("--markdown-name", default=MARKDOWN_NAME,
                        help=f"file name of the report (default {MARKDOWN_NAME})")
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    parser.add_argument("--command", default=None,
                        help="the command to show under 'Command' (default: this compare invocation)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"compare: error: {len(args.runs)} runs but {len(labels)} labels; give one --labels entry per run",
              file=sys.stderr)
        return 2
    if len(set(labels)) != len(labels):
        print(f"compare: error: labels must be distinct, got {labels}", file=sys.stderr)
        return 2
    try:
        runs = {label: load_run(path) for label, path in zip(labels, args.runs, strict=True)}
        counts, names = load_class_info(args.meta or _meta_from_runs(list(runs.values())))
        command = args.command or shlex.join(["python", "-m", "livt_ds.compare", *argv])
        paths = write_comparison(runs, args.output, counts, names, args.title, args.note, command, args.markdown_name)
    except (FileNotFoundError, ValueError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    print(report.results_table_markdown({k: r.metrics for k, r in runs.items()}), end="")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
