"""Long-tail profiles, subsampling a data set onto one, and the many/medium/few shot groups.

The shot thresholds live here only (the metrics, reports and the demo's design rule use `shot_groups`): the LT
literature's many > 100 training images, medium 20..100, few < 20.

The exponential profile is the one the long-tail literature (and LiVT) uses for CIFAR-LT:
``n_i = int(n_max * gamma ** (-i / (C - 1)))`` for the i-th class in head-to-tail order, so the head keeps
``n_max`` images and the tail ``n_max / gamma``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

MANY_SHOT = 100  # classes with more than this many training images are "many-shot"
FEW_SHOT = 20  # classes with fewer than this many are "few-shot"; the rest are "medium"
SHOT_GROUPS = ("many", "medium", "few")


def exponential_profile(n_max: int, num_classes: int, gamma: float) -> list[int]:
    """Images per class rank (head first): ``int(n_max * (1 / gamma) ** (i / (C - 1)))``, ``[C]``.

    Written as ``(1/gamma) ** (i/(C-1))`` like the reference CIFAR-LT code so that the truncation gives the
    published counts (CIFAR-10-LT gamma 100: 12,406 images; CIFAR-100-LT: 10,847).
    """
    if num_classes < 2:
        raise ValueError(f"an imbalance profile needs at least 2 classes, got {num_classes}")
    if gamma < 1:
        raise ValueError(f"imbalance gamma = max/min images per class must be >= 1, got {gamma}")
    return [int(n_max * (1.0 / gamma) ** (i / (num_classes - 1))) for i in range(num_classes)]


def head_to_tail_order(counts: Sequence[int]) -> list[int]:
    """Class indices ordered by their image count, largest first; ties keep index order."""
    return sorted(range(len(counts)), key=lambda c: (-counts[c], c))


def longtail_targets(counts: Sequence[int], gamma: float) -> list[int]:
    """Images to keep per class (indexed by class) so the set follows the exponential profile.

    Classes are ranked by their current counts (largest first); the head keeps all its images
    (``n_max``) and no class can keep more than it has.
    """
    order = head_to_tail_order(counts)
    profile = exponential_profile(counts[order[0]], len(counts), gamma)
    targets = [0] * len(counts)
    for rank, c in enumerate(order):
        targets[c] = min(counts[c], profile[rank])
    return targets


def longtail_subsample(labels: Sequence[int], num_classes: int, gamma: float, seed: int) -> list[int]:
    """Indices (ascending) of the items of ``labels`` to keep so the class counts follow the profile.

    Which items of a class are kept is a seeded random choice, independent of the other classes' sizes.
    """
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, label in enumerate(labels):
        by_class[label].append(i)
    targets = longtail_targets([len(items) for items in by_class], gamma)
    kept: list[int] = []
    for c, items in enumerate(by_class):
        rng = random.Random(f"{seed}-{c}")
        kept.extend(rng.sample(items, targets[c]))
    return sorted(kept)


def shot_groups(class_counts: Sequence[int]) -> dict[str, list[int]]:
    """Class indices per shot group from training counts ``[C]`` (a list or a 1-D tensor): many (> MANY_SHOT),
    medium (FEW_SHOT..MANY_SHOT), few (< FEW_SHOT); every group is present, empty or not."""
    groups: dict[str, list[int]] = {name: [] for name in SHOT_GROUPS}
    for i, count in enumerate(class_counts):
        count = int(count)
        groups["many" if count > MANY_SHOT else "few" if count < FEW_SHOT else "medium"].append(i)
    return groups


def imbalance_ratio(class_counts: Sequence[int]) -> float:
    """Largest over smallest non-zero class count (``inf`` when a class has no images)."""
    if not class_counts:
        return 1.0
    smallest = min(class_counts)
    return float("inf") if smallest == 0 else max(class_counts) / smallest
