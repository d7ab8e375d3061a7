"""Parameter groups (no weight decay on norms, biases, tokens, positional embeddings; layer-wise lr decay)
and the warm-up + half-cycle cosine schedule, set by hand every optimizer step.

The lr is driven here rather than by a DeepSpeed scheduler because each group has its own scale (layer decay)
and the schedule must be a pure function of the optimizer step, so a resumed run follows the same curve.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return set(names)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay only on >= 2-D weights; with layer_decay < 1 each group carries an ``lr_scale``
    (BEiT style: block i gets decay^(depth - i), embeddings decay^(depth + 1), the head 1)."""
    skip = no_weight_decay_names(model)
    if layer_decay < 1.0:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    return [g for g in groups if len(g["params"]) > 0]


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """lr for optimizer step ``step`` (0-based): linear warm-up to base_lr, then half-cycle cosine to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
