"""Test priors and the post-hoc logit adjustment for them (the paper's Theorem 3, used at test time).

A long-tailed model meets test sets whose class distribution ``pi_t`` is not the balanced one it was tuned for.
This module builds the test priors of the test-agnostic long-tail protocol and the additive logit adjustment
that turns the model's raw logits into logits for ``pi_t``.

Test priors (classes ranked ``r = 0 .. C-1`` by training count, largest first, ties by class index):

- ``uniform``: ``pi_t(c) = 1 / C``;
- ``forward-R``: ``pi_t(c) ~ R ** (-r(c) / (C - 1))`` (same order as training: the head is frequent);
- ``backward-R``: ``pi_t(c) ~ R ** (-(C - 1 - r(c)) / (C - 1))`` (reversed: the tail is frequent);
- a JSON file ``{"class name": weight, ...}`` (weights >= 0, normalised; classes not named get 0).

The adjustment. Let ``pi = n_c / N`` be the training prior and ``B(pi, q)`` the bias ``losses.logit_bias`` of
the loss's kind (``ce`` or ``bce``) and ``tau``. Training fits ``z + B(pi, pi_0)`` to the training data, where
``pi_0`` is the test prior the loss was built for (``loss.test_prior``, uniform by default). So the raw logits
``z`` are "training logits - B(pi, pi_0)", i.e. the logits for ``pi_0``, and the logits for another test prior
``pi_t`` are "training logits - B(pi, pi_t)":

    z_t = z + a(pi_t),   a(pi_t) = B(pi, pi_0) - B(pi, pi_t)

which, since ``pi`` cancels, is

    softmax models (ce, bal_ce):   a_c = tau * (log pi_t(c) - log pi_0(c))
    sigmoid models (bce, bal_bce): a_c = tau * ((log pi_t(c) - log pi_0(c)) - (log(1 - pi_t(c)) - log(1 - pi_0(c))))

For the unbalanced losses (``ce``, ``bce``) the model fits the training data with no bias: ``pi_0 = pi`` and
``tau = 1`` (Menon et al.'s logit adjustment for ``ce``). For a balanced loss and ``pi_t = pi_0`` (uniform by
default) ``a = 0``: adjusting for the prior the model was built for changes nothing.

The other softmax losses add no bias, so ``a_c = log pi_t(c) - log pi_0(c)`` (``tau = 1``) with ``pi_0`` the prior
their minimiser's softmax is the posterior for:

- ``focal``: ``pi_0 = pi``, as for ``ce``. An approximation: the focal loss is not a proper scoring rule, its
  softmax is a flattened posterior, so the adjustment moves the decision less exactly than for ``ce``.
- ``cb_ce``, ``cb_focal``: a class-weighted CE is minimised by ``softmax(z)_c ~ w_c p(c | x)``, the posterior for
  ``pi_0(c) ~ w_c pi(c)`` (``w`` the class-balanced weights of ``loss.beta``; close to uniform for beta near 1).
- ``ldam``: the margins shape the boundary but are not a prior and are not undone; ``pi_0(c) ~ w_c pi(c)`` when
  deferred re-weighting ran (``loss.drw_epoch`` before the last epoch, the default), else ``pi_0 = pi``.

The expected top-1 accuracy on a test set drawn from ``pi_t`` follows exactly from per-class accuracy measured
on a balanced split: ``E[top-1] = sum_c pi_t(c) * acc_c`` (no resampling noise). Classes without test samples
are left out and the remaining weights renormalised.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from livt_ds.losses import LOSS_NAMES, class_balanced_weights, default_drw_epoch, logit_bias

__all__ = ["STANDARD_IMBALANCES", "standard_prior_names", "profile_prior", "load_prior_file", "resolve_prior",
           "prior_adjustment", "recipe_prior_adjustment", "expected_accuracy", "class_rank"]

STANDARD_IMBALANCES = (2, 5, 10, 25, 50)
_PROFILE_RE = re.compile(r"^(forward|backward)-(\d+(?:\.\d+)?)$")
_WEIGHTED_LOSSES = ("cb_ce", "cb_focal", "ldam")  # softmax losses whose class weights set the prior they fit
_FLOOR = 1e-12  # a zero-weight class gets this prior in the adjustment (log 0 is -inf): effectively never predicted


def standard_prior_names() -> list[str]:
    """The protocol's priors in plot order: backward-50 ... backward-2, uniform, forward-2 ... forward-50."""
    back = [f"backward-{r}" for r in reversed(STANDARD_IMBALANCES)]
    return [*back, "uniform", *(f"forward-{r}" for r in STANDARD_IMBALANCES)]


def class_rank(class_counts: Sequence[int]) -> list[int]:
    """Rank of each class by training count (0 = most images; ties keep class index order), ``[C]``."""
    order = sorted(range(len(class_counts)), key=lambda c: (-int(class_counts[c]), c))
    rank = [0] * len(order)
    for r, c in enumerate(order):
        rank[c] = r
    return rank


def profile_prior(class_counts: Sequence[int], imbalance: float, direction: str) -> Tensor:
    """Forward or backward long-tailed test prior ``[C]`` (float64, sums to 1); see the module docstring."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"test prior direction {direction!r}: use 'forward' or 'backward'")
    if not imbalance >= 1:
        raise ValueError(f"test prior imbalance {imbalance}: must be >= 1 (largest / smallest class weight)")
    num_classes = len(class_counts)
    if num_classes < 2:
        raise ValueError(f"a test prior needs at least 2 classes, got {num_classes}")
    rank = torch.tensor(class_rank(class_counts), dtype=torch.float64)
    if direction == "backward":
        rank = (num_classes - 1) - rank
    weights = float(imbalance) ** (-rank / (num_classes - 1))
    return weights / weights.sum()


def load_prior_file(path: str | Path, class_names: Sequence[str]) -> Tensor:
    """A JSON prior ``{"class name": weight}`` -> ``[C]`` float64 summing to 1 (classes not named: weight 0)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"test prior file {path}: not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"test prior file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"test prior file {path}: expected a JSON object {{\"class name\": weight, ...}}")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in data if name not in index]
    if unknown:
        raise ValueError(f"test prior file {path}: unknown classes {unknown[:5]}; the model's classes are "
                         f"{list(class_names)[:5]}{' ...' if len(class_names) > 5 else ''}")
    prior = torch.zeros(len(class_names), dtype=torch.float64)
    for name, weight in data.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"test prior file {path}: weight of {name!r} is {weight!r}; weights must be numbers >= 0")
        prior[index[name]] = float(weight)
    if float(prior.sum()) <= 0:
        raise ValueError(f"test prior file {path}: all weights are 0")
    return prior / prior.sum()


def resolve_prior(spec: str, class_counts: Sequence[int], class_names: Sequence[str] | None = None) -> Tensor:
    """``uniform`` | ``forward-R`` | ``backward-R`` | a JSON file path -> test prior ``[C]`` float64."""
    num_classes = len(class_counts)
    if spec == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    match = _PROFILE_RE.match(spec)
    if match:
        return profile_prior(class_counts, float(match.group(2)), match.group(1))
    if spec.endswith(".json") or Path(spec).is_file():
        names = class_names if class_names is not None else [str(i) for i in range(num_classes)]
        return load_prior_file(spec, names)
    raise ValueError(f"test prior {spec!r}: use 'uniform', 'forward-R', 'backward-R' (R >= 1, e.g. forward-10) "
                     "or a JSON file {\"class name\": weight}")


def prior_adjustment(
    class_counts: Sequence[int],
    loss_name: str,
    test_prior: Tensor | Sequence[float],
    tau: float = 1.0,
    loss_test_prior: Sequence[float] | None = None,
    *,
    beta: float = 0.9999,
    reweighted: bool = True,
) -> Tensor:
    """Additive logit adjustment ``a = B(pi, pi_0) - B(pi, pi_t)`` ``[C]`` (fp32) for test prior ``pi_t``.

    ``loss_name``/``tau``/``loss_test_prior``/``beta`` describe how the model was trained (recipe ``loss.*``;
    ``reweighted``: LDAM's deferred re-weighting ran); ``pi_0`` is ``loss_test_prior`` (uniform when None) for the
    balanced losses, the training prior for ``ce``/``bce``/``focal``, the class-balanced one for ``cb_*``/``ldam``.
    Predict with ``argmax(z + a)``. See the module docstring for the derivation.
    """
    if loss_name not in LOSS_NAMES:
        raise ValueError(f"loss {loss_name!r} is unknown; valid: {', '.join(LOSS_NAMES)}")
    pi_t = torch.as_tensor(test_prior, dtype=torch.float64).clamp_min(_FLOOR)
    pi_t = pi_t / pi_t.sum()
    if loss_name in _WEIGHTED_LOSSES:
        pi = torch.as_tensor(class_counts, dtype=torch.float64)
        pi_0 = pi * class_balanced_weights(class_counts, beta).double() if reweighted or loss_name != "ldam" else pi
        return (torch.log(pi_t) - torch.log(pi_0 / pi_0.sum())).float()
    kind = "ce" if loss_name == "focal" else loss_name.removeprefix("bal_")
    if loss_name.startswith("bal_"):
        trained_for = logit_bias(class_counts, kind, tau=tau, test_prior=loss_test_prior).double()
    else:  # the plain loss fits the training prior: B(pi, pi) = 0, tau = 1
        trained_for, tau = torch.zeros(len(class_counts), dtype=torch.float64), 1.0
    return (trained_for - logit_bias(class_counts, kind, tau=tau, test_prior=pi_t).double()).float()


def recipe_prior_adjustment(class_counts: Sequence[int], recipe: dict, test_prior: Tensor | Sequence[float]) -> Tensor:
    """``prior_adjustment`` for a model trained with ``recipe`` (a recipe dict: a run's config.yaml, an export's
    ``livt.recipe``): its loss keys, and whether LDAM's deferred re-weighting ran (``loss.drw_epoch`` < epochs)."""
    loss, epochs = recipe.get("loss", {}), int(recipe.get("train", {}).get("epochs", 1))
    drw_epoch = loss.get("drw_epoch")
    drw_epoch = default_drw_epoch(epochs) if drw_epoch is None else int(drw_epoch)
    return prior_adjustment(class_counts, loss["name"], test_prior, tau=loss.get("tau", 1.0),
                            loss_test_prior=loss.get("test_prior"), beta=loss.get("beta", 0.9999),
                            reweighted=drw_epoch < epochs)


def expected_accuracy(per_class: Sequence[float | None], prior: Tensor | Sequence[float]) -> float | None:
    """``sum_c pi_t(c) * acc_c`` over classes with test samples (``acc_c`` not None), weights renormalised."""
    weights = torch.as_tensor(prior, dtype=torch.float64)
    if len(per_class) != weights.numel():
        raise ValueError(f"expected_accuracy: {len(per_class)} per-class accuracies for a prior of {weights.numel()}")
    present = torch.tensor([a is not None for a in per_class])
    acc = torch.tensor([a if a is not None else 0.0 for a in per_class], dtype=torch.float64)
    mass = float(weights[present].sum())
    return None if mass <= 0 else float((weights * acc)[present].sum()) / mass
