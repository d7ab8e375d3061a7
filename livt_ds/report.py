"""Plots and tables people look at instead of numbers: per-class accuracy head -> tail, reliability diagrams,
MGP reconstructions, expected top-1 under other test priors, and a markdown results table.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas (no pyplot, no display, no global state),
so this works in headless training processes. Each plot comes three ways: ``*_figure`` (a Figure),
``plot_*`` (writes a PNG, returns its Path) and ``*_image`` (a float ``[3, H, W]`` tensor in [0, 1] for
TensorBoard's ``add_image``). Units follow ``livt_ds.metrics.classification_report``: accuracies, ECE and MCE
in percent, reliability-bin confidence/accuracy as fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from livt_ds.data.longtail import SHOT_GROUPS, shot_groups
from livt_ds.priors import standard_prior_names

__all__ = [
    "per_class_accuracy_figure",
    "plot_per_class_accuracy",
    "per_class_image",
    "reliability_figure",
    "plot_reliability",
    "reliability_image",
    "reconstruction_grid",
    "figure_to_array",
    "figure_to_image",
    "save_figure",
    "save_png",
    "results_table_markdown",
    "prior_shift_figure",
    "plot_prior_shift",
    "prior_shift_image",
    "prior_table_text",
]

_GROUP_SHADES = {"many": "#4c72b0", "medium": "#dd8452", "few": "#c44e52"}
_MAX_BAR_CLASSES = 40  # above this, per-class bars are unreadable: draw running means instead
_RELIABILITY_KEYS = ("bin_lower", "bin_upper", "confidence", "accuracy", "count")
_TABLE_COLUMNS = (
    ("top-1", "top1"),
    ("many", "many"),
    ("medium", "medium"),
    ("few", "few"),
    ("ECE", "ece"),
    ("MCE", "mce"),
)


# ------------------------------------------------------------------------------------------ per-class accuracy
def per_class_accuracy_figure(
    per_class: Mapping[str, Sequence[float | None]],
    class_counts: Sequence[int],
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Per-class accuracy (percent, None = class absent from the test set) of each run label, classes ordered
    head -> tail by training count, many/medium/few regions shaded, training counts on a log twin axis."""
    counts = [int(c) for c in class_counts]
    num_classes = len(counts)
    _check_per_class(per_class, num_classes, class_names)
    order = sorted(range(num_classes), key=lambda i: (-counts[i], i))
    values = {label: _nan_array([series[i] for i in order]) for label, series in per_class.items()}
    sorted_counts = [counts[i] for i in order]

    rows = math.ceil(len(values) / 2)
    fig = _new_figure(width=min(16.0, max(8.0, 0.45 * num_classes * len(values) ** 0.5)), height=4.6 + 0.2 * rows)
    ax = fig.add_subplot(1, 1, 1)
    spans = _group_spans(sorted_counts)
    for name, (start, stop) in spans.items():
        ax.axvspan(start - 0.5, stop - 0.5, color=_GROUP_SHADES[name], alpha=0.09, lw=0)
        ax.text((start + stop - 1) / 2, 103, f"{name} ({stop - start})", ha="center", va="bottom", fontsize=9)
    means = {label: _group_means(acc, spans) for label, acc in values.items()}
    legend = {label: f"{label}: " + ", ".join(f"{g} {_fmt(m)}" for g, m in means[label].items()) for label in values}
    if num_classes <= _MAX_BAR_CLASSES:
        _draw_bars(ax, values, legend)
    else:
        _draw_running_means(ax, values, legend, num_classes)
    for k, label in enumerate(values):
        for name, mean in means[label].items():
            if mean is not None:
                ax.hlines(mean, spans[name][0] - 0.5, spans[name][1] - 0.5, colors=f"C{k}", linestyles="--", lw=1.2)
    _label_class_axis(ax, sorted_counts, [class_names[i] for i in order] if class_names else None)
    ax.set_xlim(-0.5, num_classes - 0.5)
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    twin = ax.twinx()
    twin.step(range(num_classes), sorted_counts, where="mid", color="0.35", lw=1, alpha=0.6)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)", color="0.35")
    ax.set_title(title or "per-class accuracy, head \u2192 tail")
    fig.legend(loc="outside lower center", ncol=min(len(values), 2), fontsize=8, frameon=False)
    return fig


def plot_per_class_accuracy(
    per_class: Mapping[str, Sequence[float | None]],
    class_counts: Sequence[int],
    path: str | Path,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the per-class accuracy plot (see ``per_class_accuracy_figure``) to ``path`` as PNG."""
    return save_figure(per_class_accuracy_figure(per_class, class_counts, title, class_names), path)


def per_class_image(
    per_class: Mapping[str, Sequence[float | None]],
    class_counts: Sequence[int],
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Tensor:
    """The per-class accuracy plot as a float ``[3, H, W]`` tensor in [0, 1] (TensorBoard ``add_image``)."""
    return figure_to_image(per_class_accuracy_figure(per_class, class_counts, title, class_names))


def _check_per_class(
    per_class: Mapping[str, Sequence[float | None]], num_classes: int, class_names: Sequence[str] | None
) -> None:
    if num_classes == 0:
        raise ValueError("per-class accuracy plot: class_counts is empty; pass the training images per class")
    if not per_class:
        raise ValueError("per-class accuracy plot: no runs given; pass {label: [accuracy per class]}")
    for label, series in per_class.items():
        if len(series) != num_classes:
            raise ValueError(
                f"per-class accuracy plot: run {label!r} has {len(series)} values but class_counts has "
                f"{num_classes} classes; both must come from the same data set (meta.json class_counts)"
            )
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"per-class accuracy plot: {len(class_names)} class names for {num_classes} classes")


def _nan_array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _group_spans(sorted_counts: Sequence[int]) -> dict[str, tuple[int, int]]:
    """``{group: (first, stop)}`` positions of each non-empty shot group among head -> tail sorted classes."""
    groups = shot_groups(sorted_counts)
    return {name: (min(groups[name]), max(groups[name]) + 1) for name in SHOT_GROUPS if groups[name]}


def _group_means(acc: np.ndarray, spans: Mapping[str, tuple[int, int]]) -> dict[str, float | None]:
    """Class-mean accuracy per shot group (None when no class of the group has test samples)."""
    chunks = {name: acc[start:stop] for name, (start, stop) in spans.items()}
    return {name: None if np.isnan(c).all() else float(np.nanmean(c)) for name, c in chunks.items()}


def _fmt(value: float | None) -> str:
    return "\u2013" if value is None else f"{value:.1f}"


def _draw_bars(ax, values: Mapping[str, np.ndarray], legend: Mapping[str, str]) -> None:
    width = 0.8 / len(values)
    for k, (label, acc) in enumerate(values.items()):
        x = np.arange(len(acc)) - 0.4 + width * (k + 0.5)
        ax.bar(x, np.nan_to_num(acc), width=width, label=legend[label], color=f"C{k}", alpha=0.85)
        missing = np.isnan(acc)
        if missing.any():  # a class without test samples: mark it instead of drawing a 0 % bar
            ax.plot(x[missing], np.full(missing.sum(), 1.5), "x", color=f"C{k}", ms=5)


def _draw_running_means(ax, values: Mapping[str, np.ndarray], legend: Mapping[str, str], num_classes: int) -> None:
    window = max(3, num_classes // 25)
    kernel = np.ones(window)
    x = np.arange(num_classes)
    for k, (label, acc) in enumerate(values.items()):
        ax.plot(x, acc, ".", color=f"C{k}", ms=2, alpha=0.25)
        valid = ~np.isnan(acc)
        total = np.convolve(np.where(valid, acc, 0.0), kernel, mode="same")
        weight = np.convolve(valid.astype(np.float64), kernel, mode="same")
        smooth = np.divide(total, weight, out=np.full(num_classes, math.nan), where=weight > 0)
        ax.plot(x, smooth, "-", color=f"C{k}", lw=1.8, label=f"{legend[label]} (running mean of {window})")


def _label_class_axis(ax, sorted_counts: Sequence[int], names: Sequence[str] | None) -> None:
    n = len(sorted_counts)
    if n <= _MAX_BAR_CLASSES:
        ticks = list(range(n))
        labels = [f"{names[i]}\n{sorted_counts[i]}" if names else str(sorted_counts[i]) for i in ticks]
        ax.set_xticks(ticks, labels, rotation=90 if names else 0, fontsize=8)
    else:
        ticks = sorted({round(t) for t in np.linspace(0, n - 1, 11)})
        ax.set_xticks(ticks, [str(sorted_counts[i]) for i in ticks], fontsize=8)
    ax.set_xlabel("classes, head \u2192 tail (labelled with training images per class)")


# ------------------------------------------------------------------------------------------ reliability
def reliability_figure(reliability: Mapping[str, Mapping], title: str = "") -> Figure:
    """Reliability diagram per run label: accuracy per confidence bin against the diagonal, the gap hatched,
    the share of samples per bin in grey, ECE/MCE (percent) in the panel title when given."""
    if not reliability:
        raise ValueError("reliability plot: no runs given; pass {label: classification_report(...)['reliability']}")
    columns = min(len(reliability), 4)
    rows = math.ceil(len(reliability) / columns)
    fig = _new_figure(width=3.6 * columns, height=3.8 * rows + (0.4 if title else 0.0))
    for k, (label, bins) in enumerate(reliability.items()):
        ax = fig.add_subplot(rows, columns, k + 1)
        _draw_reliability(ax, label, _reliability_arrays(label, bins))
        ax.set_title(_reliability_title(label, bins), fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def plot_reliability(reliability: Mapping[str, Mapping], path: str | Path, title: str = "") -> Path:
    """Write the reliability diagram(s) (see ``reliability_figure``) to ``path`` as PNG."""
    return save_figure(reliability_figure(reliability, title), path)


def reliability_image(reliability: Mapping[str, Mapping], title: str = "") -> Tensor:
    """The reliability diagram(s) as a float ``[3, H, W]`` tensor in [0, 1] (TensorBoard ``add_image``)."""
    return figure_to_image(reliability_figure(reliability, title))


def _reliability_arrays(label: str, bins: Mapping) -> dict[str, np.ndarray]:
    missing = [key for key in _RELIABILITY_KEYS if key not in bins]
    if missing:
        raise ValueError(
            f"reliability plot: run {label!r} lacks {missing}; pass classification_report(...)['reliability'] "
            f"(keys {list(_RELIABILITY_KEYS)})"
        )
    lengths = {key: len(bins[key]) for key in _RELIABILITY_KEYS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"reliability plot: run {label!r} has bin lists of different lengths {lengths}")
    arrays = {key: _nan_array(bins[key]) for key in _RELIABILITY_KEYS}
    arrays["count"] = np.nan_to_num(arrays["count"])
    return arrays


def _draw_reliability(ax, label: str, b: Mapping[str, np.ndarray]) -> None:
    width = b["bin_upper"] - b["bin_lower"]
    full = ~np.isnan(b["accuracy"]) & ~np.isnan(b["confidence"]) & (b["count"] > 0)
    acc, conf = b["accuracy"][full], b["confidence"][full]
    ax.bar(
        b["bin_lower"][full],
        acc,
        width=width[full],
        align="edge",
        color="C0",
        alpha=0.75,
        edgecolor="k",
        lw=0.5,
        label="accuracy",
    )
    ax.bar(
        b["bin_lower"][full],
        conf - acc,
        bottom=acc,
        width=width[full],
        align="edge",
        fill=False,
        edgecolor="C3",
        hatch="///",
        lw=0.8,
        label="gap to confidence",
    )
    share = b["count"] / max(b["count"].sum(), 1.0)  # narrow dark bars: where the samples are
    centre = (b["bin_lower"] + b["bin_upper"]) / 2
    ax.bar(centre, share, width=0.35 * width, color="0.2", alpha=0.6, label="share of samples")
    ax.plot([0, 1], [0, 1], "--", color="0.3", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=7)


def _reliability_title(label: str, bins: Mapping) -> str:
    scores = [
        f"{name} {float(bins[key]):.1f}%" for name, key in (("ECE", "ece"), ("MCE", "mce")) if bins.get(key) is not None
    ]
    return f"{label}\n{', '.join(scores)}" if scores else label


# ------------------------------------------------------------------------------------------ reconstructions
def reconstruction_grid(
    images: Tensor,
    pred_images: Tensor,
    mask_images: Tensor,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    max_images: int = 8,
    scale: int = 1,
) -> Tensor:
    """MGP reconstructions as one image: a row per sample of (original, masked input, reconstruction,
    reconstruction with the visible patches pasted back).

    ``images`` and ``pred_images`` [B, 3, H, W] are normalised with ``mean``/``std`` (predictions already mapped
    back from norm-pix space); ``mask_images`` [B, 3 or 1, H, W] is 1 where a patch was masked. Returns a float
    [3, H_grid, W_grid] tensor in [0, 1]; masked patches of the input are shown mid-grey. ``scale`` > 1 enlarges
    every tile nearest-neighbour (pixels stay sharp squares), so that e.g. 32 px images can be seen.
    """
    _check_reconstruction_inputs(images, pred_images, mask_images, max_images)
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"reconstruction_grid: scale {scale!r} must be an integer >= 1")
    n = min(max_images, images.shape[0])
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    original = (images[:n].detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    recon = (pred_images[:n].detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    mask = mask_images[:n].detach().float().cpu().expand_as(original)
    masked = original * (1 - mask) + 0.5 * mask
    pasted = original * (1 - mask) + recon * mask
    tiles = torch.stack([original, masked, recon, pasted], dim=1).flatten(0, 1)  # [n * 4, 3, H, W]
    tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # [n * 4, 3, H * s, W * s]
    return make_grid(tiles, nrow=4, padding=2, pad_value=1.0).clamp(0, 1)


def _check_reconstruction_inputs(images: Tensor, pred_images: Tensor, mask_images: Tensor, max_images: int) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"reconstruction_grid: images must be [B, 3, H, W], got {list(images.shape)}")
    if pred_images.shape != images.shape:
        raise ValueError(
            f"reconstruction_grid: pred_images {list(pred_images.shape)} must match images {list(images.shape)}; "
            "unpatchify the predictions first"
        )
    b, _, h, w = images.shape
    if (
        mask_images.dim() != 4
        or mask_images.shape[0] != b
        or mask_images.shape[1] not in (1, 3)
        or tuple(mask_images.shape[2:]) != (h, w)
    ):
        raise ValueError(
            f"reconstruction_grid: mask_images must be [{b}, 1 or 3, {h}, {w}] (1 = masked), "
            f"got {list(mask_images.shape)}"
        )
    if max_images < 1 or b == 0:
        raise ValueError(f"reconstruction_grid: nothing to show (batch {b}, max_images {max_images})")


# ------------------------------------------------------------------------------------------ output helpers
def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` with Agg: uint8 ``[H, W, 3]`` (TensorBoard ``add_image(..., dataformats="HWC")``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def figure_to_image(fig: Figure) -> Tensor:
    """Render ``fig``: float ``[3, H, W]`` tensor in [0, 1] (TensorBoard ``add_image`` default CHW)."""
    return torch.from_numpy(figure_to_array(fig)).permute(2, 0, 1).float().div(255.0)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created); returns the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def save_png(image: Tensor | np.ndarray, path: str | Path) -> Path:
    """Write an image as PNG: a ``[3, H, W]`` tensor (float in [0, 1] or uint8) or a uint8 ``[H, W, 3]`` array."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"save_png: expected a [3, H, W] tensor, got {list(image.shape)}")
        chw = image.detach().cpu()
        if chw.dtype != torch.uint8:
            chw = (chw.float().clamp(0, 1) * 255).round().to(torch.uint8)
        array = chw.expand(3, -1, -1).permute(1, 2, 0).numpy()
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"save_png: expected a uint8 [H, W, 3] array, got {array.dtype} {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
    return path


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------------------------------ table
def results_table_markdown(rows: Mapping[str, Mapping]) -> str:
    """Markdown table ``label | top-1 | many | medium | few | ECE | MCE`` from ``{label: metrics}`` (the keys
    of metrics.json: top1, many, medium, few, ece, mce, in percent); missing/None -> "–", one decimal."""
    header = "| label | " + " | ".join(name for name, _ in _TABLE_COLUMNS) + " |"
    rule = "| --- |" + " ---: |" * len(_TABLE_COLUMNS)
    lines = [header, rule]
    for label, metrics in rows.items():
        cells = [_format_cell(metrics.get(key), label, key) for _, key in _TABLE_COLUMNS]
        name = str(label).replace("|", "\\|")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_cell(value: object, label: str, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"results table: {label!r} {key} = {value!r} is not a number or None")
    return f"{float(value):.1f}"


# ------------------------------------------------------------------------------------------ test priors
def prior_shift_figure(table: Mapping[str, Mapping[str, float | None]], title: str = "") -> Figure:
    """Expected top-1 (percent) vs test prior, backward-50 ... uniform ... forward-50, raw and prior-adjusted,
    from ``metrics["test_priors"]`` (``{prior: {"raw", "adjusted"}}``; priors outside the standard set are not
    drawn)."""
    names = [n for n in standard_prior_names() if n in table]
    if not names:
        raise ValueError(f"test prior plot: none of the standard priors in the table (it has {sorted(table)[:5]})")
    fig = _new_figure(width=9.0, height=4.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    for key, style in (("raw", "o-"), ("adjusted", "s--")):
        ax.plot(x, _nan_array([table[n].get(key) for n in names]), style, label=f"{key} prediction")
    if "uniform" in names:
        ax.axvline(names.index("uniform"), color="0.6", lw=0.8)
    ax.set_xticks(x, [n.replace("backward-", "bwd ").replace("forward-", "fwd ") for n in names], rotation=45)
    ax.set_xlabel("test prior (imbalance; bwd: tail classes frequent, fwd: head classes frequent)")
    ax.set_ylabel("expected top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(title or "top-1 under other test priors (Theorem 3 adjustment)")
    return fig


def plot_prior_shift(table: Mapping[str, Mapping[str, float | None]], path: str | Path, title: str = "") -> Path:
    """Write the test-prior plot (see ``prior_shift_figure``) to ``path`` as PNG."""
    return save_figure(prior_shift_figure(table, title), path)


def prior_shift_image(table: Mapping[str, Mapping[str, float | None]], title: str = "") -> Tensor:
    """The test-prior plot as a float ``[3, H, W]`` tensor in [0, 1] (TensorBoard ``add_image``)."""
    return figure_to_image(prior_shift_figure(table, title))


def prior_table_text(table: Mapping[str, Mapping[str, float | None]]) -> str:
    """Plain-text table ``test prior | raw | adjusted`` (expected top-1 in percent, one decimal)."""
    width = max(len("test prior"), *(len(n) for n in table))
    lines = [f"{'test prior':<{width}}  {'raw':>6}  {'adjusted':>8}"]
    for name, row in table.items():
        lines.append(f"{name:<{width}}  {_format_cell(row.get('raw'), name, 'raw'):>6}  "
                     f"{_format_cell(row.get('adjusted'), name, 'adjusted'):>8}")
    return "\n".join(lines)


def save_images(images: dict[str, torch.Tensor], folder: Path, step: int) -> None:
    """Each ``[3, H, W]`` image as ``folder/<name>_stepNNNNNNNN.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        save_png(image, folder / f"{name}_step{step:08d}.png")
