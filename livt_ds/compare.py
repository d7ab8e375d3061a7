"""`python -m livt_ds.compare RUN... --labels L... --output docs/`: compare finished runs side by side.

Reads each run's ``metrics.json`` (written by training's last evaluation or by ``livt eval``) and writes
``OUTPUT/loss_comparison.md`` (results table, per-class accuracy head -> tail, the recipe settings each run used,
the command), ``OUTPUT/per_class_accuracy.png`` and ``OUTPUT/reliability.png``. The class counts that define
head -> tail order and the many/medium/few groups come from the shard set's ``meta.json``
(``--meta``, else the first run's ``config.yaml`` ``data.path``).

When a run holds ``test_metrics.json`` (its test split, read once at the end of training), the report and the
console add the test numbers of the checkpoint chosen on val and of the last one.

Runs that share a label are seeds of one setting (their recipes may differ in ``train.seed`` only): the table
shows mean +- sample standard deviation over them, the per-class table and plot the per-class mean, the
reliability diagram the bins of all their predictions pooled.
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

import numpy as np
import yaml

from livt_ds import report
from livt_ds.data.longtail import FEW_SHOT, MANY_SHOT
from livt_ds.losses import default_drw_epoch
from livt_ds.metrics import ECE_BINS
from livt_ds.run_files import CONFIG, EVAL_METRICS, METRICS_LOG, RUN_INFO, TEST_METRICS

__all__ = [
    "RunResult", "load_run", "eval_history", "load_class_info", "check_seed_group", "mean_std", "mean_metrics",
    "comparison_markdown", "test_table", "write_comparison", "main",
]

MARKDOWN_NAME = "loss_comparison.md"
PER_CLASS_NAME = "per_class_accuracy.png"
RELIABILITY_NAME = "reliability.png"
_REQUIRED_METRICS = ("top1", "many", "medium", "few", "ece", "mce", "per_class", "reliability")
_TABLE_KEYS = (
    ("top-1", "top1"), ("many", "many"), ("medium", "medium"), ("few", "few"), ("ECE", "ece"), ("MCE", "mce"),
)
_IGNORED_SECTIONS = ("log", "eval", "checkpoint")  # may differ between seeds of one setting
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
    ("gamma", "loss", "gamma"),
    ("beta", "loss", "beta"),
    ("margin", "loss", "max_margin"),
    ("scale", "loss", "scale"),
    ("DRW epoch", "loss", "drw_epoch"),
    ("seed", "train", "seed"),
)
# The loss keys that act on each loss (others are shown as "-").
_LOSS_KEY_USERS = {"tau": ("bal_ce", "bal_bce"), "gamma": ("focal", "cb_focal"), "beta": ("cb_ce", "cb_focal", "ldam"),
                   "max_margin": ("ldam",), "scale": ("ldam",), "drw_epoch": ("ldam",)}
_TEST_KEYS = (("top-1", "top1"), ("many", "many"), ("medium", "medium"), ("few", "few"), ("ECE", "ece"))
_TEST_CHECKPOINTS = (("best_on_val", "best on val"), ("last", "last"))


@dataclass(frozen=True)
class RunResult:
    """One run to compare: its folder, metrics.json contents, resolved recipe (empty when absent) and the
    evaluations during training as ``[(epoch, {metric: value})]`` from metrics.jsonl (empty for `livt eval` runs)."""

    path: Path
    metrics: dict[str, Any]
    recipe: dict[str, Any]
    history: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    test: dict[str, Any] | None = None  # test_metrics.json: {"split", "best_on_val": {...}, "last": {...}}


def load_run(path: str | Path) -> RunResult:
    """Read ``RUN/metrics.json`` (``path`` may also be the metrics.json file) and ``RUN/config.yaml`` if present."""
    path = Path(path)
    metrics_path = path if path.suffix == ".json" else path / EVAL_METRICS
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: missing; pass a run folder that finished an evaluation "
                                "(finetune with eval, or `livt eval --output RUN`)")
    metrics = json.loads(metrics_path.read_text())
    absent = [key for key in _REQUIRED_METRICS if key not in metrics]
    if absent:
        raise ValueError(f"{metrics_path}: keys {absent} missing; is this a finetune/eval run (not an MGP run)?")
    config_path = metrics_path.parent / CONFIG
    recipe = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    test_path = metrics_path.parent / TEST_METRICS
    test = json.loads(test_path.read_text()) if test_path.is_file() else None
    return RunResult(metrics_path.parent, metrics, recipe or {}, eval_history(metrics_path.parent), test)


def eval_history(run: str | Path) -> list[tuple[float, dict[str, float]]]:
    """``[(epoch, {"top1": .., "few": .., ...})]`` of the evaluations logged in ``RUN/metrics.jsonl`` during
    training; epochs from ``RUN/run.yaml``'s steps_per_epoch (steps when it is absent)."""
    run = Path(run)
    log = run / METRICS_LOG
    if not log.is_file():
        return []
    per_epoch = 1
    if (run / RUN_INFO).is_file():
        schedule = (yaml.safe_load((run / RUN_INFO).read_text()) or {}).get("schedule", {})
        per_epoch = int(schedule.get("steps_per_epoch") or 1)
    history = []
    for line in log.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "eval/top1" in row:
            values = {k[5:]: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
            history.append((row["step"] / per_epoch, values))
    return history


def _history_lines(groups: Mapping[str, Sequence[RunResult]]) -> list[str]:
    """Markdown table of top-1 / few-shot accuracy at each evaluation during training (how fast each loss gets
    there; mean over the seeds that logged that epoch); empty when no run logged evaluations."""
    tables: dict[str, dict[float, dict[str, float | None]]] = {}
    for label, runs in groups.items():
        epochs = sorted({epoch for run in runs for epoch, _ in run.history})
        if epochs:
            rows = [[dict(run.history).get(epoch) for run in runs] for epoch in epochs]
            tables[label] = {epoch: {key: mean_std([r.get(key) for r in row if r])[0] for key in ("top1", "few")}
                             for epoch, row in zip(epochs, rows, strict=True)}
    if not tables:
        return []
    epochs = sorted({epoch for table in tables.values() for epoch in table})
    lines = ["## During fine-tuning: top-1 / few-shot accuracy (%) at each evaluation", ""]
    if any(len(runs) > 1 for runs in groups.values()):
        lines += ["Mean over the seeds of each setting.", ""]
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


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1) of the non-None values; std None for fewer than 2 values."""
    kept = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    if kept.size == 0:
        return None, None
    return float(kept.mean()), float(kept.std(ddof=1)) if kept.size > 1 else None


def _seed(run: RunResult) -> object:
    return run.recipe.get("train", {}).get("seed")


def check_seed_group(label: str, runs: Sequence[RunResult]) -> None:
    """Refuse to average runs that are not seeds of one setting: recipes must match except ``train.seed``
    (and log/eval/checkpoint), seeds must differ."""
    if len(runs) < 2:
        return
    seeds = [_seed(run) for run in runs]
    if len(set(map(str, seeds))) != len(seeds):
        raise ValueError(f"label {label!r}: runs {[str(r.path) for r in runs]} have seeds {seeds}; the runs of one "
                         "label are averaged as seeds, so give each a different train.seed (or another label)")

    def setting(run: RunResult) -> dict[str, Any]:
        recipe = {k: v for k, v in run.recipe.items() if k not in _IGNORED_SECTIONS}
        return {**recipe, "train": {k: v for k, v in recipe.get("train", {}).items() if k != "seed"}}

    first = setting(runs[0])
    for run in runs[1:]:
        other = setting(run)
        diff = sorted(f"{section}.{key}" for section in set(first) | set(other)
                      for key in set(first.get(section) or {}) | set(other.get(section) or {})
                      if (first.get(section) or {}).get(key) != (other.get(section) or {}).get(key))
        if diff:
            raise ValueError(f"label {label!r}: {runs[0].path} and {run.path} differ in {diff}, not only in "
                             "train.seed; runs of one label must be seeds of one setting")


def mean_metrics(runs: Sequence[RunResult]) -> dict[str, Any]:
    """Seeds of one setting -> ``{key: mean, key_std: std, per_class: [mean], reliability: pooled bins, seeds: n}``
    for the table keys (top1, many, medium, few, ece, mce, in percent)."""
    out: dict[str, Any] = {"seeds": len(runs)}
    for _, key in _TABLE_KEYS:
        out[key], out[f"{key}_std"] = mean_std([run.metrics.get(key) for run in runs])
    per_class = zip(*(run.metrics["per_class"] for run in runs), strict=True)
    out["per_class"] = [mean_std(values)[0] for values in per_class]
    out["reliability"] = _pooled_bins([run.metrics["reliability"] for run in runs])
    return out


def _pooled_bins(bins: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The reliability bins of all runs' predictions together: counts summed, confidence/accuracy count-weighted."""
    first = bins[0]
    if any(b["bin_lower"] != first["bin_lower"] for b in bins):
        raise ValueError("compare: runs of one label use different reliability bins; evaluate them the same way")
    count = np.sum([b["count"] for b in bins], axis=0)
    pooled: dict[str, Any] = {"bin_lower": first["bin_lower"], "bin_upper": first["bin_upper"],
                              "count": [int(c) for c in count]}
    for key in ("confidence", "accuracy"):
        weighted = np.sum([[(v or 0.0) * n for v, n in zip(b[key], b["count"], strict=True)] for b in bins], axis=0)
        pooled[key] = [float(w / c) if c else None for w, c in zip(weighted, count, strict=True)]
    return pooled


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "\u2013"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} \u00b1 {std:.1f}"


def _results_table(groups: Mapping[str, Sequence[RunResult]]) -> str:
    """``label | top-1 | ... | MCE``: the value of a single run, ``mean \u00b1 std`` over several seeds."""
    lines = ["| label | " + " | ".join(name for name, _ in _TABLE_KEYS) + " |",
             "| --- |" + " ---: |" * len(_TABLE_KEYS)]
    for label, runs in groups.items():
        summary = mean_metrics(runs)
        cells = [_cell(summary[key], summary[f"{key}_std"]) for _, key in _TABLE_KEYS]
        lines.append(f"| {str(label).replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_table(groups: Mapping[str, Sequence[RunResult]]) -> str:
    """``label | checkpoint | split | top-1 | ... | ECE`` of the runs' test_metrics.json ("" when none has one):
    the checkpoint chosen on val and the last one, mean ± std over seeds that all have test numbers."""
    rows = []
    for label, runs in groups.items():
        tests = [run.test for run in runs if run.test]
        if len(tests) != len(runs):
            continue
        split = "/".join(sorted({str(t.get("split")) for t in tests}))
        for key, name in _TEST_CHECKPOINTS:
            cells = [_cell(*mean_std([t[key].get(metric) for t in tests])) for _, metric in _TEST_KEYS]
            rows.append(f"| {str(label).replace('|', chr(92) + '|')} | {name} | {split} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = ["| label | checkpoint | split | " + " | ".join(name for name, _ in _TEST_KEYS) + " |",
            "| --- | --- | --- |" + " ---: |" * len(_TEST_KEYS)]
    return "\n".join(head + rows) + "\n"


def _as_groups(runs: Mapping[str, RunResult | Sequence[RunResult]]) -> dict[str, list[RunResult]]:
    return {label: [run] if isinstance(run, RunResult) else list(run) for label, run in runs.items()}


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
    if section == "loss" and key in _LOSS_KEY_USERS and recipe.get("loss", {}).get("name") not in _LOSS_KEY_USERS[key]:
        value = None  # a key the run's loss does not use (tau only scales the balanced losses' bias)
    if key == "drw_epoch" and value is None and recipe.get("loss", {}).get("name") == "ldam":
        epochs = recipe.get("train", {}).get("epochs")
        value = f"{default_drw_epoch(epochs)} (default)" if epochs else None  # the epoch the loss really used
    if value is None or value == "":
        return "\u2013"
    return str(value).replace("|", "\\|")


def comparison_markdown(
    runs: Mapping[str, RunResult | Sequence[RunResult]],
    class_counts: Sequence[int],
    class_names: Sequence[str] | None = None,
    title: str = "Loss comparison",
    notes: Sequence[str] = (),
    command: str = "",
) -> str:
    """The markdown report: results table, per-class accuracy (head -> tail), accuracy during training (when
    logged), settings per run, notes, command. ``runs`` maps a label to one run or to the runs of its seeds."""
    groups = _as_groups(runs)
    seeds = {label: len(group) for label, group in groups.items()}
    lines = [f"# {title}", "", _results_table(groups).rstrip(), ""]
    caption = (f"Top-1 and many (> {MANY_SHOT} training images) / medium ({FEW_SHOT}..{MANY_SHOT}) / "
               f"few (< {FEW_SHOT}) accuracy, ECE and MCE ({ECE_BINS} bins) in percent, from each run's metrics.json")
    if max(seeds.values()) > 1:
        counts = ", ".join(f"{label} {n}" for label, n in seeds.items())
        caption += (f"; mean \u00b1 sample standard deviation over seeds (seeds per row: {counts}); "
                    "per-class accuracy below is the mean over seeds")
    lines += [caption + ".", ""]
    tests = test_table(groups)
    if tests:
        lines += ["## Test split (read once)", "", tests.rstrip(), "",
                  "Each run's test split evaluated once after training (test_metrics.json): the checkpoint chosen on "
                  "the eval split (val) and the last one. The table above is the eval split.", ""]
    lines += [f"![per-class accuracy]({PER_CLASS_NAME})", "", "## Per-class accuracy (%), head \u2192 tail", ""]
    order = sorted(range(len(class_counts)), key=lambda i: (-class_counts[i], i))
    means = {label: mean_metrics(group)["per_class"] for label, group in groups.items()}
    lines.append("| class | train images | " + " | ".join(groups) + " |")
    lines.append("| --- | ---: |" + " ---: |" * len(groups))
    for i in order:
        name = class_names[i] if class_names else str(i)
        cells = ["\u2013" if means[label][i] is None else f"{means[label][i]:.0f}" for label in groups]
        lines.append(f"| {name} | {class_counts[i]} | " + " | ".join(cells) + " |")
    lines += ["", f"![reliability diagrams]({RELIABILITY_NAME})", ""] + _history_lines(groups)
    lines += ["## Settings per run", ""]
    columns = [col for col, _, _ in _SETTINGS]
    lines.append("| label | run | " + " | ".join(columns) + " |")
    lines.append("| --- | --- |" + " --- |" * len(_SETTINGS))
    for label, group in groups.items():
        cells = [_setting(group[0].recipe, section, key) for _, section, key in _SETTINGS]
        if len(group) > 1:
            cells[columns.index("seed")] = ", ".join(str(_seed(run)) for run in group)
        paths = ", ".join(f"`{run.path}`" for run in group)
        lines.append(f"| {label} | {paths} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    if command:
        lines += ["", "## Command", "", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def write_comparison(
    runs: Mapping[str, RunResult | Sequence[RunResult]],
    output: str | Path,
    class_counts: Sequence[int],
    class_names: Sequence[str] | None = None,
    title: str = "Loss comparison",
    notes: Sequence[str] = (),
    command: str = "",
    markdown_name: str = MARKDOWN_NAME,
) -> dict[str, Path]:
    """Write the markdown and both PNGs into ``output``; returns {"markdown", "per_class", "reliability"} paths.
    ``runs`` maps a label to one run or to the runs of its seeds (checked by ``check_seed_group``)."""
    groups = _as_groups(runs)
    if not groups or not all(groups.values()):
        raise ValueError("compare: no runs given")
    for label, group in groups.items():
        check_seed_group(label, group)
        for run in group:
            if len(run.metrics["per_class"]) != len(class_counts):
                raise ValueError(f"compare: run {label!r} ({run.path}) has {len(run.metrics['per_class'])} classes, "
                                 f"the shard set's meta.json {len(class_counts)}; pass --meta of the set the runs used")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summaries = {label: mean_metrics(group) for label, group in groups.items()}
    several = max(len(group) for group in groups.values()) > 1
    per_class = {label: summary["per_class"] for label, summary in summaries.items()}
    reliability = {label: {**summary["reliability"], "ece": summary["ece"], "mce": summary["mce"]}
                   for label, summary in summaries.items()}
    suffix = " (mean over seeds)" if several else ""
    pooled = " (seeds pooled; mean ECE/MCE)" if several else ""
    paths = {
        "per_class": report.plot_per_class_accuracy(per_class, class_counts, output / PER_CLASS_NAME,
                                                    title=f"{title}: per-class accuracy{suffix}",
                                                    class_names=class_names),
        "reliability": report.plot_reliability(reliability, output / RELIABILITY_NAME,
                                               title=f"{title}: reliability{pooled}"),
    }
    markdown = comparison_markdown(groups, class_counts, class_names, title, notes, command)
    paths["markdown"] = output / markdown_name
    paths["markdown"].write_text(markdown)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m livt_ds.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.json (finetune or eval runs)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one label per run (default: the folder names); runs sharing a label are seeds of one "
                             "setting and are shown as mean +- std")
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
    try:
        groups: dict[str, list[RunResult]] = {}
        for label, path in zip(labels, args.runs, strict=True):
            groups.setdefault(label, []).append(load_run(path))
        flat = [run for group in groups.values() for run in group]
        counts, names = load_class_info(args.meta or _meta_from_runs(flat))
        command = args.command or shlex.join(["python", "-m", "livt_ds.compare", *argv])
        paths = write_comparison(groups, args.output, counts, names, args.title, args.note, command, args.markdown_name)
    except (FileNotFoundError, ValueError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    print(_results_table(groups), end="")
    tests = test_table(groups)
    if tests:
        print(f"test split (read once):\n{tests}", end="")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
