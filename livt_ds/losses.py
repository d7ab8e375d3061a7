"""Classification losses for long-tailed data behind one factory: CE, Bal-CE, BCE, the paper's Balanced BCE, and the
baselines users compare it with: focal, class-balanced CE / focal and LDAM-DRW.

The balanced losses add a fixed per-class bias B (from the training prior pi = n_c / N and a test prior pi_t) to
the logits **inside the loss only**; predictions and evaluation keep the raw logits z.
- Bal-CE: softmax CE on z + tau * (log pi - log pi_t).
- Bal-BCE (LiVT, Theorem 3): BCE on z + tau * ((log pi - log pi_t) - (log(1 - pi) - log(1 - pi_t))); with a
  uniform test prior this is Eq. 10, log pi - log(1 - pi) + log(C - 1).
- focal (Lin et al., ICCV 2017): batch mean of -(1 - p_y)^gamma log p_y, p = softmax(z).
- cb_ce / cb_focal (Cui et al., CVPR 2019): CE / focal with the class-balanced weights
  w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to C; the batch mean is weighted, as F.cross_entropy's.
- ldam (Cao et al., NeurIPS 2019): F.cross_entropy(s * (z - m_y * onehot(y)), y) with margins m_c ~ n_c^(-1/4)
  (the largest is max_margin), and deferred re-weighting (DRW): the class-balanced weights apply from epoch
  drw_epoch on (the loss is told the epoch through ``set_epoch``). livt-ds keeps its linear head for LDAM, as
  for every loss, so that a comparison changes the loss alone and the exported model stays the same timm
  classifier; s then acts as an inverse temperature on unnormalised logits, not as the radius of the paper's
  cosine classifier.
Soft targets (mixup / cutmix / label smoothing) are handled by every loss except ldam, whose margin belongs to a
single true class: it refuses them (``HARD_LABEL_LOSSES``). For soft targets y the focal terms are
-sum_c y_c (1 - p_c)^gamma log p_c, and a weighted loss divides by sum_i sum_c w_c y_ic (F.cross_entropy's
normaliser for one-hot y).
Losses are computed in fp32 (autocast disabled, logits cast) so they are stable under bf16 training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSS_NAMES", "HARD_LABEL_LOSSES", "logit_bias", "class_balanced_weights", "ldam_margins",
           "default_drw_epoch", "build_loss", "SoftmaxCrossEntropy", "BinaryCrossEntropy", "FocalLoss", "LDAMLoss"]

BIAS_KINDS = ("ce", "bce")
LOSS_NAMES = ("ce", "bal_ce", "bce", "bal_bce", "focal", "cb_ce", "cb_focal", "ldam")
HARD_LABEL_LOSSES = ("ldam",)  # refuse soft targets (mixup, cutmix, label smoothing)
COUNT_LOSSES = ("bal_ce", "bal_bce", "cb_ce", "cb_focal", "ldam")  # need the training class counts
DRW_FRACTION = 0.8  # LDAM-DRW re-weights from 80 % of the epochs on (160 of 200 in the paper)


def _as_prior(values: Sequence[float] | Tensor, what: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if t.dim() != 1:
        raise ValueError(f"logit_bias: {what} must be a 1-D sequence, got shape {list(t.shape)}")
    return t


def _train_prior(class_counts: Sequence[int] | Tensor) -> Tensor:
    counts = _as_prior(class_counts, "class_counts")
    if counts.numel() < 2:
        raise ValueError(f"logit_bias: need at least 2 classes, got class_counts of length {counts.numel()}")
    if not bool((counts > 0).all()):
        empty = torch.nonzero(counts <= 0).flatten().tolist()[:10]
        raise ValueError(
            f"logit_bias: class_counts must be > 0 for every class (classes {empty} have none); "
            "a class without training images has no defined prior - drop it or check the data set's meta.json"
        )
    return counts / counts.sum()


def _test_prior(test_prior: Sequence[float] | Tensor | None, num_classes: int) -> Tensor:
    if test_prior is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    prior = _as_prior(test_prior, "test_prior")
    if prior.numel() != num_classes:
        raise ValueError(f"logit_bias: test_prior has {prior.numel()} entries, class_counts has {num_classes}")
    if not bool(((prior > 0) & (prior < 1)).all()):
        raise ValueError("logit_bias: every test_prior entry must be in (0, 1)")
    total = float(prior.sum())
    if abs(total - 1.0) > 1e-4:
        raise ValueError(f"logit_bias: test_prior must sum to 1, it sums to {total:.6f}")
    return prior


def logit_bias(
    class_counts: Sequence[int] | Tensor,
    kind: str,
    tau: float = 1.0,
    test_prior: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Per-class logit bias [C] (fp32) that a balanced loss adds to the logits.

    kind "ce":  tau * (log pi - log pi_t)
    kind "bce": tau * ((log pi - log pi_t) - (log(1 - pi) - log(1 - pi_t)))   (uniform pi_t: Eq. 10)
    pi = class_counts / N; pi_t = test_prior, uniform 1/C when None. Computed in float64, returned as fp32.
    """
    if kind not in BIAS_KINDS:
        raise ValueError(f"logit_bias: kind={kind!r} is unknown; use one of {BIAS_KINDS}")
    pi = _train_prior(class_counts)
    pi_t = _test_prior(test_prior, pi.numel())
    bias = torch.log(pi) - torch.log(pi_t)
    if kind == "bce":
        bias = bias - (torch.log1p(-pi) - torch.log1p(-pi_t))
    return (tau * bias).float()


def _soft_targets(target: Tensor, logits: Tensor) -> Tensor:
    """Hard int64 [B] or soft [B, C] targets -> fp32 [B, C] (one-hot via scatter: no host sync)."""
    batch, num_classes = logits.shape
    if target.dim() == 1 and not target.is_floating_point():
        if target.shape[0] != batch:
            raise ValueError(f"loss: {target.shape[0]} targets for {batch} logits rows")
        return torch.zeros_like(logits).scatter_(1, target.long().unsqueeze(1), 1.0)
    if target.shape != logits.shape:
        raise ValueError(
            f"loss: soft targets must have the logits' shape {list(logits.shape)}, got {list(target.shape)} "
            f"({target.dtype}); hard targets must be an int64 tensor of shape [{batch}]"
        )
    return target.float()


class _BiasedLoss(nn.Module):
    """Holds the optional per-class bias as a (non-persistent) buffer; `.bias` is None for the plain losses."""

    bias: Tensor | None

    def __init__(self, bias: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)

    def _adjusted(self, logits: Tensor) -> Tensor:
        """fp32 logits + bias, out of place (the caller's logits are never changed)."""
        if logits.dim() != 2:
            raise ValueError(f"loss: logits must be [B, C], got shape {list(logits.shape)}")
        z = logits.float()
        if self.bias is None:
            return z
        if self.bias.numel() != z.shape[1]:
            raise ValueError(f"loss: logits have {z.shape[1]} classes but the bias was built for {self.bias.numel()}")
        return z + self.bias.to(device=z.device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return "balanced" if self.bias is not None else ""


class SoftmaxCrossEntropy(_BiasedLoss):
    """Softmax CE (Bal-CE when a bias is given): batch mean of -sum_c y_c log softmax(z + B)_c. logits [B, C]."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = self._adjusted(logits)
            if target.dim() == 1 and not target.is_floating_point():
                return F.cross_entropy(z, target.long())
            y = _soft_targets(target, z)
            return -(y * F.log_softmax(z, dim=1)).sum(dim=1).mean()


class BinaryCrossEntropy(_BiasedLoss):
    """Sigmoid BCE (Bal-BCE when a bias is given): per-sample sum over classes, batch mean. logits [B, C]."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = self._adjusted(logits)
            y = _soft_targets(target, z)
            return F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(dim=1).mean()


def class_balanced_weights(class_counts: Sequence[int] | Tensor, beta: float) -> Tensor:
    """Class-balanced weights [C] (fp32): w_c = (1 - beta) / (1 - beta^n_c), i.e. the inverse of the effective
    number of samples, normalised to sum to C. beta = 0 gives 1 for every class; beta -> 1 gives C / n_c / sum."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"loss.beta={beta}: must be in [0, 1) (the paper uses 0.9999 for ImageNet-LT, 0.999 on CIFAR)")
    _train_prior(class_counts)  # every count > 0
    counts = _as_prior(class_counts, "class_counts")
    if beta == 0.0:
        weights = torch.ones_like(counts)
    else:  # (1 - beta^n) / (1 - beta), with expm1/log1p so that beta close to 1 keeps its digits
        weights = torch.expm1(math.log(beta) * counts) / math.expm1(math.log(beta))
        weights = 1.0 / weights
    return (weights * counts.numel() / weights.sum()).float()


def ldam_margins(class_counts: Sequence[int] | Tensor, max_margin: float) -> Tensor:
    """LDAM margins [C] (fp32): m_c proportional to n_c^(-1/4), scaled so that the rarest class's is max_margin."""
    if not max_margin > 0:
        raise ValueError(f"loss.max_margin={max_margin}: must be > 0 (the paper uses 0.5)")
    _train_prior(class_counts)
    counts = _as_prior(class_counts, "class_counts")
    margins = counts ** -0.25
    return (margins * (max_margin / margins.max())).float()


def default_drw_epoch(epochs: int) -> int:
    """The epoch from which LDAM-DRW re-weights when ``loss.drw_epoch`` is unset: 80 % of the epochs."""
    return int(DRW_FRACTION * epochs)


class _WeightedSoftmaxLoss(nn.Module):
    """Optional per-class weights (a non-persistent buffer) and the weighted batch mean of per-class terms."""

    weight: Tensor | None

    def __init__(self, weight: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.detach().float().clone(), persistent=False)

    def _logits(self, logits: Tensor) -> Tensor:
        if logits.dim() != 2:
            raise ValueError(f"loss: logits must be [B, C], got shape {list(logits.shape)}")
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ValueError(f"loss: logits have {logits.shape[1]} classes but the weights were built for "
                             f"{self.weight.numel()}")
        return logits.float()

    def _mean(self, terms: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        """terms [B, C] (already times y): plain batch mean, or sum w_c terms / sum w_c y (F.cross_entropy's)."""
        if weight is None:
            return terms.sum(dim=1).mean()
        w = weight.to(device=terms.device, dtype=torch.float32)
        return (terms * w).sum() / (y * w).sum()


class FocalLoss(_WeightedSoftmaxLoss):
    """Softmax focal loss, class-balanced when weights are given: -sum_c y_c (1 - p_c)^gamma log p_c, batch mean
    (weighted as F.cross_entropy's when weighted). gamma = 0 is (weighted) CE."""

    def __init__(self, gamma: float, weight: Tensor | None = None) -> None:
        super().__init__(weight)
        if not gamma >= 0:
            raise ValueError(f"loss.gamma={gamma}: must be >= 0 (0 is cross-entropy; the paper uses 2)")
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = self._logits(logits)
            if self.gamma == 0 and target.dim() == 1 and not target.is_floating_point():
                return F.cross_entropy(z, target.long(), weight=self.weight)
            y = _soft_targets(target, z)
            log_p = F.log_softmax(z, dim=1)
            modulation = (-torch.expm1(log_p)).clamp_min(0.0).pow(self.gamma)  # (1 - p)^gamma, exact near p = 1
            return self._mean(-y * modulation * log_p, y, self.weight)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}" + (", class-balanced" if self.weight is not None else "")


class LDAMLoss(_WeightedSoftmaxLoss):
    """LDAM with deferred re-weighting: F.cross_entropy(s * (z - m_y onehot(y)), y, weight=w once DRW is on).

    ``set_epoch(e)`` (the trainer calls it through the task) turns the class-balanced weights on for
    e >= drw_epoch. Hard labels only: a margin belongs to one true class."""

    def __init__(self, margins: Tensor, scale: float, weight: Tensor, drw_epoch: int) -> None:
        super().__init__(weight)
        if not scale > 0:
            raise ValueError(f"loss.scale={scale}: must be > 0 (the paper uses 30)")
        self.register_buffer("margins", margins.detach().float().clone(), persistent=False)
        self.scale, self.drw_epoch, self.epoch = float(scale), int(drw_epoch), 0

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch of the coming steps (decides whether the DRW weights apply)."""
        self.epoch = int(epoch)

    @property
    def reweighting(self) -> bool:
        return self.epoch >= self.drw_epoch

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() != 1 or target.is_floating_point():
            raise ValueError(
                f"loss ldam: needs hard int64 labels [B], got {target.dtype} of shape {list(target.shape)} (soft "
                "targets from mixup / cutmix / label smoothing); set augment.mixup=0 augment.cutmix=0 "
                "augment.label_smoothing=0")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = self._logits(logits)
            if self.margins.numel() != z.shape[1]:
                raise ValueError(f"loss: logits have {z.shape[1]} classes but the margins were built for "
                                 f"{self.margins.numel()}")
            target = target.long()
            margin = self.margins.to(z.device).gather(0, target)  # m_y [B]
            shifted = z.scatter_add(1, target.unsqueeze(1), -margin.unsqueeze(1))  # z - m_y * onehot(y)
            return F.cross_entropy(self.scale * shifted, target, weight=self.weight if self.reweighting else None)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, drw_epoch={self.drw_epoch}"


def build_loss(
    name: str,
    class_counts: Sequence[int] | Tensor | None = None,
    tau: float = 1.0,
    test_prior: Sequence[float] | Tensor | None = None,
    *,
    gamma: float = 2.0,
    beta: float = 0.9999,
    max_margin: float = 0.5,
    scale: float = 30.0,
    drw_epoch: int = 0,
) -> nn.Module:
    """Loss by name (``LOSS_NAMES``); all but ce, bce and focal need the training class counts.

    forward(logits [B, C], target int64 [B] or soft [B, C] (not for ldam)) -> 0-dim fp32 loss.
    tau / test_prior: bal_ce, bal_bce; gamma: focal, cb_focal; beta: cb_ce, cb_focal, ldam (DRW weights);
    max_margin / scale / drw_epoch: ldam.
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"loss.name={name!r} is unknown; valid names: {', '.join(LOSS_NAMES)}")
    if name in COUNT_LOSSES and class_counts is None:
        raise ValueError(
            f"loss.name={name!r} needs the training class counts (the long-tail prior); pass class_counts, "
            "e.g. from the shard set's meta.json"
        )
    if name == "focal":
        return FocalLoss(gamma)
    if name in ("cb_ce", "cb_focal"):
        return FocalLoss(gamma if name == "cb_focal" else 0.0, class_balanced_weights(class_counts, beta))
    if name == "ldam":
        return LDAMLoss(ldam_margins(class_counts, max_margin), scale, class_balanced_weights(class_counts, beta),
                        drw_epoch)
    kind = name.removeprefix("bal_")
    loss_cls = SoftmaxCrossEntropy if kind == "ce" else BinaryCrossEntropy
    if not name.startswith("bal_"):
        return loss_cls()
    return loss_cls(logit_bias(class_counts, kind, tau=tau, test_prior=test_prior))
