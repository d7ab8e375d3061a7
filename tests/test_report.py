"""Plots and tables: PNGs that open, head -> tail ordering, None handling, reconstruction grid layout, markdown."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from livt_ds import report
from livt_ds.metrics import classification_report

COUNTS = [5, 500, 40, 150, 12, 80]  # deliberately not sorted: the plot must order head -> tail


def _open_png(path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 1000
    image = Image.open(path)
    assert image.format == "PNG"
    return image


def _reliability(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(COUNTS)).repeat_interleave(20)
    logits = torch.randn(len(labels), len(COUNTS), generator=g) + 2.0 * torch.nn.functional.one_hot(labels).float()
    metrics = classification_report(logits, labels, COUNTS)
    return {**metrics["reliability"], "ece": metrics["ece"], "mce": metrics["mce"]}


def test_per_class_plot_writes_png_with_none(tmp_path) -> None:
    per_class = {"ce": [0.0, 95.0, 50.0, 80.0, None, 60.0], "bal_bce": [40.0, 85.0, 60.0, 75.0, 30.0, 70.0]}
    path = report.plot_per_class_accuracy(per_class, COUNTS, tmp_path / "sub" / "per_class.png", title="demo")
    width, height = _open_png(path).size
    assert 600 <= width <= 2000 and 300 <= height <= 1200
    # what is drawn: bars head -> tail (counts 500, 150, 80, 40, 12, 5 = classes 1, 3, 5, 2, 4, 0), the class
    # without test samples (None) as a 0-height bar with an x marker above it, one bar series per run
    ax = report.per_class_accuracy_figure(per_class, COUNTS).axes[0]
    assert [b.get_height() for b in ax.containers[0]] == [95.0, 80.0, 60.0, 50.0, 0.0, 0.0]
    assert [b.get_height() for b in ax.containers[1]] == [85.0, 75.0, 70.0, 60.0, 30.0, 40.0]
    centres = [b.get_x() + b.get_width() / 2 for b in ax.containers[0]]
    (marker,) = [line for line in ax.lines if line.get_marker() == "x"]
    assert list(marker.get_xdata()) == pytest.approx([centres[4]]) and list(marker.get_ydata()) == [1.5]


def test_per_class_plot_orders_head_to_tail_and_shades_groups() -> None:
    per_class = {"ce": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
    fig = report.per_class_accuracy_figure(per_class, COUNTS, class_names=list("abcdef"))
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["b\n500", "d\n150", "f\n80", "c\n40", "e\n12", "a\n5"]
    heights = [bar.get_height() for bar in ax.containers[0]]
    assert heights == [2.0, 4.0, 6.0, 3.0, 5.0, 1.0]
    texts = {t.get_text() for t in ax.texts}
    assert {"many (2)", "medium (2)", "few (2)"} <= texts
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["ce: many 3.0, medium 4.5, few 3.0"]


def test_per_class_plot_many_classes_uses_running_means(tmp_path) -> None:
    counts = [int(1000 * 200 ** (-i / 99)) for i in range(100)]
    rng = np.random.default_rng(0)
    per_class = {"bce": [float(v) for v in rng.uniform(0, 100, 100)], "bal_bce": [None] * 50 + [50.0] * 50}
    fig = report.per_class_accuracy_figure(per_class, counts)
    assert len(fig.axes[0].get_xticklabels()) <= 12
    # the drawn running means, computed here: window 4 (100 // 25), positions j-2 .. j+1, classes without a value
    # (None) left out of the mean, NaN where the window holds none
    lines = {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in fig.axes[0].lines}
    for label, values in per_class.items():
        (key,) = [name for name in lines if name.startswith(f"{label}:") and "running mean of 4" in name]
        expected = []
        for j in range(100):
            window = [v for v in values[max(0, j - 2):j + 2] if v is not None]
            expected.append(sum(window) / len(window) if window else math.nan)
        np.testing.assert_allclose(lines[key], expected, rtol=1e-12, atol=1e-9, equal_nan=True)
    assert np.isnan(lines[next(n for n in lines if n.startswith("bal_bce:"))][:48]).all()
    assert _open_png(report.save_figure(fig, tmp_path / "big.png")).size[0] >= 800


def test_per_class_plot_rejects_mismatched_lengths(tmp_path) -> None:
    with pytest.raises(ValueError, match="'ce' has 2 values but class_counts has 6"):
        report.plot_per_class_accuracy({"ce": [1.0, 2.0]}, COUNTS, tmp_path / "x.png")


def test_reliability_plot_from_metrics_output(tmp_path) -> None:
    rel = {"ce": _reliability(0), "bal_bce": _reliability(1)}
    path = report.plot_reliability(rel, tmp_path / "rel.png", title="calibration")
    width, height = _open_png(path).size
    assert 500 <= width <= 2000 and 300 <= height <= 1200
    fig = report.reliability_figure(rel)
    assert len(fig.axes) == 2
    assert f"ECE {rel['ce']['ece']:.1f}%" in fig.axes[0].get_title()
    for ax, bins in zip(fig.axes, rel.values()):  # what is drawn: the bins of each run, as metrics gave them
        check_reliability_bars(ax, bins)


def check_reliability_bars(ax, bins: dict) -> None:
    """The panel's bars are the bins: accuracy bars from each non-empty bin's lower edge, the gap to the
    confidence stacked on them, and the share of samples per bin (all bins) at the bin centres."""
    full = [i for i, c in enumerate(bins["count"]) if c and bins["accuracy"][i] is not None]
    acc = [bins["accuracy"][i] for i in full]
    gap = [bins["confidence"][i] - bins["accuracy"][i] for i in full]
    accuracy, gaps, share = ax.containers
    assert [b.get_x() for b in accuracy] == pytest.approx([bins["bin_lower"][i] for i in full])
    assert [b.get_width() for b in accuracy] == pytest.approx([bins["bin_upper"][i] - bins["bin_lower"][i]
                                                              for i in full])
    assert [b.get_height() for b in accuracy] == pytest.approx(acc, abs=1e-12)
    assert [b.get_height() for b in gaps] == pytest.approx(gap, abs=1e-12)
    assert [b.get_y() for b in gaps] == pytest.approx(acc, abs=1e-12)
    total = sum(bins["count"])
    assert [b.get_height() for b in share] == pytest.approx([c / total for c in bins["count"]], abs=1e-12)
    centres = [(lo + hi) / 2 for lo, hi in zip(bins["bin_lower"], bins["bin_upper"])]
    assert [b.get_x() + b.get_width() / 2 for b in share] == pytest.approx(centres)


def test_reliability_plot_handles_empty_bins_and_missing_ece(tmp_path) -> None:
    bins = {
        "bin_lower": [0.0, 0.5],
        "bin_upper": [0.5, 1.0],
        "confidence": [None, 0.8],
        "accuracy": [None, 0.6],
        "count": [0, 10],
    }
    fig = report.reliability_figure({"only": bins})
    assert fig.axes[0].get_title() == "only"
    check_reliability_bars(fig.axes[0], bins)  # the empty bin draws no accuracy bar and a 0 share
    assert [b.get_height() for b in fig.axes[0].containers[0]] == pytest.approx([0.6])
    assert [b.get_height() for b in fig.axes[0].containers[2]] == [0.0, 1.0]
    _open_png(report.plot_reliability({"only": bins}, tmp_path / "r.png"))
    with pytest.raises(ValueError, match="lacks \\['count'\\]"):
        report.reliability_figure({"bad": {k: v for k, v in bins.items() if k != "count"}})


def test_images_for_tensorboard(tmp_path) -> None:
    """TensorBoard's images are the plots: the pixels of the PNG the same figure writes, as CHW floats in [0, 1]."""
    def png_pixels(fig) -> torch.Tensor:
        with Image.open(report.save_figure(fig, tmp_path / "f.png")) as png:
            return torch.from_numpy(np.asarray(png.convert("RGB")).copy()).permute(2, 0, 1).float() / 255

    per_class = {"ce": [10.0, 90.0, 50.0, 70.0, 30.0, 60.0]}
    image = report.per_class_image(per_class, COUNTS)
    assert image.dtype == torch.float32 and float(image.std()) > 0
    assert torch.equal(image, png_pixels(report.per_class_accuracy_figure(per_class, COUNTS)))
    array = report.figure_to_array(report.reliability_figure({"m": _reliability()}))
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    expected = png_pixels(report.reliability_figure({"m": _reliability()}))
    assert torch.equal(torch.from_numpy(array).permute(2, 0, 1).float() / 255, expected)
    assert torch.equal(report.reliability_image({"m": _reliability()}), expected)


def test_reconstruction_grid_layout_and_content() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 16, 16, generator=g)  # in [0, 1] before normalisation
    recon = torch.rand(3, 3, 16, 16, generator=g)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, :8] = 1.0  # top half masked
    grid = report.reconstruction_grid((pixels - m) / s, (recon - m) / s, mask, mean, std, max_images=2)
    assert grid.shape == (3, 2 * 18 + 2, 4 * 18 + 2)  # 2 samples x 4 panels, 2-px padding
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0

    def tile(row: int, col: int) -> torch.Tensor:
        return grid[:, 2 + 18 * row : 18 + 18 * row, 2 + 18 * col : 18 + 18 * col]

    torch.testing.assert_close(tile(1, 0), pixels[1], atol=1e-5, rtol=0)
    assert torch.allclose(tile(0, 1)[:, :8], torch.full((3, 8, 16), 0.5))
    torch.testing.assert_close(tile(0, 1)[:, 8:], pixels[0, :, 8:], atol=1e-5, rtol=0)
    torch.testing.assert_close(tile(0, 2), recon[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(tile(0, 3)[:, :8], recon[0, :, :8], atol=1e-5, rtol=0)
    torch.testing.assert_close(tile(0, 3)[:, 8:], pixels[0, :, 8:], atol=1e-5, rtol=0)


def test_reconstruction_grid_upscales_nearest_neighbour() -> None:
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0
    grid = report.reconstruction_grid(pixels, pixels.flip(-1), mask, (0, 0, 0), (1, 1, 1), scale=4)
    assert grid.shape == (3, 2 * 34 + 2, 4 * 34 + 2)  # 8 px tiles shown at 32 px, padding still 2 px
    original = grid[:, 2:34, 2:34]
    # every source pixel is a sharp 4 x 4 block of one colour
    torch.testing.assert_close(original, pixels[0].repeat_interleave(4, 1).repeat_interleave(4, 2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="scale"):
        report.reconstruction_grid(pixels, pixels, mask, (0, 0, 0), (1, 1, 1), scale=0)


def test_reconstruction_grid_rejects_bad_shapes() -> None:
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="pred_images"):
        report.reconstruction_grid(x, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="mask_images"):
        report.reconstruction_grid(x, x, torch.zeros(2, 2, 8, 8), (0, 0, 0), (1, 1, 1))


def test_save_png_tensor_and_array(tmp_path) -> None:
    tensor = torch.linspace(0, 1, 3 * 10 * 20).reshape(3, 10, 20)
    assert _open_png_size(report.save_png(tensor, tmp_path / "t.png")) == (20, 10)
    array = np.full((7, 9, 3), 200, dtype=np.uint8)
    path = report.save_png(array, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(path)), array)
    with pytest.raises(ValueError, match="\\[3, H, W\\]"):
        report.save_png(torch.zeros(10, 20), tmp_path / "bad.png")


def _open_png_size(path) -> tuple[int, int]:
    return Image.open(path).size


def test_results_table_markdown() -> None:
    rows = {
        "ce": {"top1": 54.46, "many": 70.0, "medium": 50.04, "few": 0, "ece": 12.345, "mce": 30.0},
        "bal|bce": {"top1": 60.9, "many": None, "few": math.nan, "ece": 3.0, "mce": 9.96},
    }
    assert report.results_table_markdown(rows) == (
        "| label | top-1 | many | medium | few | ECE | MCE |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| ce | 54.5 | 70.0 | 50.0 | 0.0 | 12.3 | 30.0 |\n"
        "| bal\\|bce | 60.9 | \u2013 | \u2013 | \u2013 | 3.0 | 10.0 |\n"
    )
    with pytest.raises(ValueError, match="'ce' top1"):
        report.results_table_markdown({"ce": {"top1": "high"}})
