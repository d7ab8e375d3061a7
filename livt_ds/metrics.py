"""Evaluation metrics for long-tailed classification: top-1, many/medium/few-shot accuracy, per-class accuracy,
ECE/MCE and the reliability-diagram bins. All use the raw logits (never the balanced-loss bias).

Shot groups follow the LT literature: many > 100 training images, medium 20..100, few < 20.
Results are plain Python floats/ints/None so they go straight into JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SHOT_GROUPS", "shot_groups", "calibration", "classification_report"]

SHOT_GROUPS = ("many", "medium", "few")


def shot_groups(class_counts: Sequence[int] | Tensor) -> dict[str, list[int]]:
    """Class indices per shot group from training counts: many (> 100), medium (20..100), few (< 20)."""
    counts = [int(c) for c in torch.as_tensor(class_counts).flatten().tolist()]
    return {
        "many": [i for i, c in enumerate(counts) if c > 100],
        "medium": [i for i, c in enumerate(counts) if 20 <= c <= 100],
        "few": [i for i, c in enumerate(counts) if c < 20],
    }


def _percent(num: float, den: float) -> float | None:
    return None if den == 0 else 100.0 * float(num) / float(den)


def calibration(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> dict:
    """ECE/MCE (percent) and reliability bins from confidences [N] in [0, 1] and correctness [N] (bool).

    Equal-width bins (lower, upper] on [0, 1] (a confidence of exactly 0 goes to the first bin).
    ECE = sum_b |B_b|/N |acc_b - conf_b|; MCE = max over non-empty bins. Bin confidence/accuracy are fractions
    in [0, 1] (None for an empty bin).
    """
    if n_bins < 1:
        raise ValueError(f"calibration: n_bins={n_bins} must be >= 1")
    conf = confidence.detach().double().cpu().flatten()
    hit = correct.detach().double().cpu().flatten()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf, edges[1:], right=False).clamp_(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.bincount(index, weights=conf, minlength=n_bins)
    hit_sum = torch.bincount(index, weights=hit, minlength=n_bins)
    nonempty = count > 0
    mean_conf = torch.where(nonempty, conf_sum / count.clamp_min(1), torch.zeros_like(conf_sum))
    mean_acc = torch.where(nonempty, hit_sum / count.clamp_min(1), torch.zeros_like(hit_sum))
    gap = (mean_acc - mean_conf).abs()
    total = max(conf.numel(), 1)
    return {
        "ece": 100.0 * float((count / total * gap).sum()),
        "mce": 100.0 * float(gap[nonempty].max()) if bool(nonempty.any()) else 0.0,
        "reliability": {
            "bin_lower": [float(x) for x in edges[:-1].tolist()],
            "bin_upper": [float(x) for x in edges[1:].tolist()],
            "confidence": [float(c) if n else None for c, n in zip(mean_conf.tolist(), nonempty.tolist(), strict=True)],
            "accuracy": [float(a) if n else None for a, n in zip(mean_acc.tolist(), nonempty.tolist(), strict=True)],
            "count": [int(n) for n in count.tolist()],
        },
    }


def _check_inputs(logits: Tensor, labels: Tensor, num_classes: int) -> None:
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"classification_report: expected logits [N, C] and labels [N], got {list(logits.shape)} and "
            f"{list(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("classification_report: no samples to evaluate (empty logits)")
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"classification_report: logits have {logits.shape[1]} classes, class_counts has {num_classes}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"classification_report: labels must be in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def classification_report(
    logits: Tensor, labels: Tensor, class_counts: Sequence[int] | Tensor, n_bins: int = 15
) -> dict:
    """Everything the eval writes to metrics.json, from raw logits [N, C] and labels [N].

    Returns top1, many, medium, few, ece, mce (percent floats; a group is None when none of its classes has test
    samples), per_class (C percent floats, None for a class without samples), num_samples, num_classes,
    group_classes (number of classes per group) and reliability (bins for a reliability diagram, fractions).
    """
    counts = [int(c) for c in torch.as_tensor(class_counts).flatten().tolist()]
    num_classes = len(counts)
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu().flatten()
    _check_inputs(logits, labels, num_classes)
    probs = torch.softmax(logits, dim=1)
    confidence, pred = probs.max(dim=1)
    correct = pred == labels
    per_count = torch.bincount(labels, minlength=num_classes)
    per_hit = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    groups = shot_groups(counts)
    report: dict = {"top1": _percent(correct.sum(), labels.numel())}
    for name in SHOT_GROUPS:
        idx = torch.tensor(groups[name], dtype=torch.long)
        report[name] = _percent(per_hit[idx].sum(), per_count[idx].sum()) if len(idx) else None
    report.update(calibration(confidence, correct, n_bins))
    report["per_class"] = [_percent(h, n) for h, n in zip(per_hit.tolist(), per_count.tolist(), strict=True)]
    report["num_samples"] = int(labels.numel())
    report["num_classes"] = num_classes
    report["group_classes"] = {name: len(groups[name]) for name in SHOT_GROUPS}
    return report
