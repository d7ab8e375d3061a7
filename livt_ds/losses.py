"""Classification losses for long-tailed data: CE, Bal-CE, BCE and the paper's Balanced BCE behind one factory.

The balanced losses add a fixed per-class bias B (from the training prior pi = n_c / N and a test prior pi_t) to
the logits **inside the loss only**; predictions and evaluation keep the raw logits z.
- Bal-CE: softmax CE on z + tau * (log pi - log pi_t).
- Bal-BCE (LiVT, Theorem 3): BCE on z + tau * ((log pi - log pi_t) - (log(1 - pi) - log(1 - pi_t))); with a
  uniform test prior this is Eq. 10, log pi - log(1 - pi) + log(C - 1).
Losses are computed in fp32 (autocast disabled, logits cast) so they are stable under bf16 training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSS_NAMES", "logit_bias", "build_loss", "SoftmaxCrossEntropy", "BinaryCrossEntropy"]

BIAS_KINDS = ("ce", "bce")
LOSS_NAMES = ("ce", "bal_ce", "bce", "bal_bce")


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


def build_loss(
    name: str,
    class_counts: Sequence[int] | Tensor | None = None,
    tau: float = 1.0,
    test_prior: Sequence[float] | Tensor | None = None,
) -> nn.Module:
    """Loss by name: "ce", "bal_ce", "bce", "bal_bce" (the balanced ones need the training class counts).

    forward(logits [B, C], target int64 [B] or soft [B, C]) -> 0-dim fp32 batch-mean loss.
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"loss.name={name!r} is unknown; valid names: {', '.join(LOSS_NAMES)}")
    kind = name.removeprefix("bal_")
    loss_cls = SoftmaxCrossEntropy if kind == "ce" else BinaryCrossEntropy
    if not name.startswith("bal_"):
        return loss_cls()
    if class_counts is None:
        raise ValueError(
            f"loss.name={name!r} needs the training class counts (the long-tail prior); pass class_counts, "
            "e.g. from the shard set's meta.json"
        )
    return loss_cls(logit_bias(class_counts, kind, tau=tau, test_prior=test_prior))
