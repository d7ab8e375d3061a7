"""Evaluation metrics for long-tailed classification: top-1, many/medium/few-shot accuracy, per-class accuracy,
ECE/MCE and the reliability-diagram bins. All use the raw logits (never the balanced-loss bias), in fp32.

Shot groups follow the LT literature; `shot_groups` and its thresholds are defined once, in `livt_ds.data.longtail`.
Results are plain Python floats/ints/None so they go straight into JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from livt_ds import dist
from livt_ds.data.longtail import SHOT_GROUPS, shot_groups

__all__ = ["ECE_BINS", "calibration", "classification_report", "prediction_report",
           "per_class_accuracy", "EvalAccumulator"]

ECE_BINS = 15  # equal-width confidence bins of ECE / MCE and the reliability diagram


def _percent(num: float, den: float) -> float | None:
    return None if den == 0 else 100.0 * float(num) / float(den)


def calibration(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> dict:
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
    logits: Tensor, labels: Tensor, class_counts: Sequence[int] | Tensor, n_bins: int = ECE_BINS
) -> dict:
    """Everything the eval writes to metrics.json, from raw logits [N, C] and labels [N].

    Returns top1, many, medium, few, ece, mce (percent floats; a group is None when none of its classes has test
    samples), per_class (C percent floats, None for a class without samples), num_samples, num_classes,
    group_classes (number of classes per group) and reliability (bins for a reliability diagram, fractions).
    """
    num_classes = len(torch.as_tensor(class_counts).flatten())
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu().flatten()
    _check_inputs(logits, labels, num_classes)
    confidence, pred = torch.softmax(logits, dim=1).max(dim=1)
    return prediction_report(pred, confidence, labels, class_counts, n_bins)


def prediction_report(
    pred: Tensor, confidence: Tensor, labels: Tensor, class_counts: Sequence[int] | Tensor, n_bins: int = ECE_BINS
) -> dict:
    """``classification_report`` from what it needs per sample: predicted class [N], its softmax probability [N]
    and the label [N] (so a distributed eval gathers three numbers per sample, not C logits)."""
    counts = [int(c) for c in torch.as_tensor(class_counts).flatten().tolist()]
    num_classes = len(counts)
    pred, labels = pred.detach().long().cpu().flatten(), labels.detach().long().cpu().flatten()
    if labels.numel() == 0:
        raise ValueError("classification_report: no samples to evaluate (empty logits)")
    if pred.shape != labels.shape or confidence.numel() != labels.numel():
        raise ValueError(f"prediction_report: pred {list(pred.shape)}, confidence {list(confidence.shape)} and "
                         f"labels {list(labels.shape)} must all be [N]")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"classification_report: labels must be in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    correct = pred == labels
    per_count = torch.bincount(labels, minlength=num_classes)
    per_hit = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    groups = shot_groups(counts)
    report: dict = {"top1": _percent(correct.sum(), labels.numel())}
    for name in SHOT_GROUPS:
        idx = torch.tensor(groups[name], dtype=torch.long)
        report[name] = _percent(per_hit[idx].sum(), per_count[idx].sum()) if len(idx) else None
    report.update(calibration(confidence, correct, n_bins))
    report["per_class"] = per_class_accuracy(per_hit, per_count)
    report["num_samples"] = int(labels.numel())
    report["num_classes"] = num_classes
    report["group_classes"] = {name: len(groups[name]) for name in SHOT_GROUPS}
    return report


def per_class_accuracy(hits: Tensor, counts: Tensor) -> list[float | None]:
    """Percent correct per class from correct predictions [C] and samples [C] (None for a class without samples)."""
    return [_percent(h, n) for h, n in zip(hits.tolist(), counts.tolist(), strict=True)]


class EvalAccumulator:
    """What the metrics need from a stream of logits, kept per rank and gathered once at the end.

    ``update(logits [B, C], labels [B])`` computes in fp32 (whatever the model's dtype): the softmax confidence and
    the argmax per sample, and for each of the P logit adjustments ``adjustments [P, C]`` (test priors, see
    ``livt_ds.priors``) the per-class count of correct adjusted predictions ``argmax(z + a_p)``. ``gather()`` (a
    collective: every rank calls it) returns pred/confidence/labels [N] of all ranks and the adjusted hits [P, C]
    summed over ranks: O(N + P*C) numbers instead of the N*C logits.
    """

    def __init__(self, num_classes: int, adjustments: Tensor | None = None) -> None:
        self.num_classes = num_classes
        adj = torch.zeros(0, num_classes) if adjustments is None else adjustments.detach().float()
        if adj.dim() != 2 or adj.shape[1] != num_classes:
            raise ValueError(f"EvalAccumulator: adjustments must be [P, {num_classes}], got {list(adj.shape)}")
        self.adjustments = adj
        self.pred: list[Tensor] = []
        self.confidence: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.adjusted_hits = torch.zeros(adj.shape[0], num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        z = logits.detach().float()
        labels = labels.to(z.device).long().flatten()
        _check_inputs(z, labels, self.num_classes)
        confidence, pred = torch.softmax(z, dim=1).max(dim=1)
        self.pred.append(pred.cpu())
        self.confidence.append(confidence.cpu())
        self.labels.append(labels.cpu())
        self.adjustments = self.adjustments.to(z.device)  # moved once; hits stay on the device until gather()
        self.adjusted_hits = self.adjusted_hits.to(z.device)
        for p in range(self.adjustments.shape[0]):  # one [B, C] at a time: no [P, B, C] tensor
            hit = (z + self.adjustments[p]).argmax(dim=1) == labels
            self.adjusted_hits[p] += torch.bincount(labels[hit], minlength=self.num_classes)

    def gather(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(pred [N], confidence [N], labels [N], adjusted hits [P, C]) over all ranks, on every rank."""
        def local(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

        pred = dist.gather_tensors(local(self.pred, torch.long))
        confidence = dist.gather_tensors(local(self.confidence, torch.float32))
        labels = dist.gather_tensors(local(self.labels, torch.long))
        return pred, confidence, labels, dist.all_reduce_sum(self.adjusted_hits)
