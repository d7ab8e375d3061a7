"""Test priors and the Theorem-3 logit adjustment at test time, against hand-computed values; the eval accumulator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from livt_ds.config import load_recipe
from livt_ds.data.shards import train_class_counts
from livt_ds.losses import logit_bias
from livt_ds.metrics import EvalAccumulator, classification_report
from livt_ds.priors import (
    expected_accuracy,
    prior_adjustment,
    profile_prior,
    resolve_prior,
    standard_prior_names,
)
from livt_ds.tasks import FinetuneTask

COUNTS = [6, 3, 1]  # training prior pi = [0.6, 0.3, 0.1]; ranks 0, 1, 2
FORWARD_4 = [4 / 7, 2 / 7, 1 / 7]  # 4 ** (-r / 2) = 1, 1/2, 1/4, normalised


def test_profiles_follow_the_training_order() -> None:
    assert profile_prior(COUNTS, 4, "forward").tolist() == pytest.approx(FORWARD_4)
    assert profile_prior(COUNTS, 4, "backward").tolist() == pytest.approx(FORWARD_4[::-1])
    # ranks come from the counts, not the class index: class 2 is the head here
    assert profile_prior([1, 3, 6], 4, "forward").tolist() == pytest.approx(FORWARD_4[::-1])
    assert resolve_prior("uniform", COUNTS).tolist() == pytest.approx([1 / 3] * 3)
    assert resolve_prior("forward-4", COUNTS).tolist() == pytest.approx(FORWARD_4)
    names = standard_prior_names()
    assert names[0] == "backward-50" and names[5] == "uniform" and names[-1] == "forward-50" and len(names) == 11


# Hand-computed: a = B(pi, pi_0) - B(pi, pi_t), pi_0 uniform (1/3) for the balanced losses, pi for the plain ones.
HAND = {
    # bal_bce: (log pi_t - log 1/3) - (log(1 - pi_t) - log 2/3): log((12/7) / (9/14)) = log(8/3), ...
    "bal_bce": [math.log(8 / 3), math.log(4 / 5), math.log(1 / 3)],
    # bal_ce: log pi_t - log 1/3
    "bal_ce": [math.log(12 / 7), math.log(6 / 7), math.log(3 / 7)],
    # ce: log pi_t - log pi
    "ce": [math.log((4 / 7) / 0.6), math.log((2 / 7) / 0.3), math.log((1 / 7) / 0.1)],
    # bce: logit(pi_t) - logit(pi)
    "bce": [math.log((4 / 3) / 1.5), math.log((2 / 5) / (3 / 7)), math.log((1 / 6) / (1 / 9))],
}


@pytest.mark.parametrize("loss", sorted(HAND))
def test_adjustment_matches_the_hand_computed_example(loss: str) -> None:
    adj = prior_adjustment(COUNTS, loss, torch.tensor(FORWARD_4))
    assert adj.dtype == torch.float32
    assert adj.tolist() == pytest.approx(HAND[loss], abs=1e-6)


def test_adjustment_changes_the_prediction_the_right_way_round() -> None:
    z = torch.tensor([[0.0, 0.5, 0.9]])  # raw: the tail class 2 wins (a Bal-BCE model favours the tail)
    assert int(z.argmax()) == 2
    forward = prior_adjustment(COUNTS, "bal_bce", resolve_prior("forward-4", COUNTS))
    backward = prior_adjustment(COUNTS, "bal_bce", resolve_prior("backward-4", COUNTS))
    assert int((z + forward).argmax()) == 0  # head-heavy test set: the head class
    assert int((z + backward).argmax()) == 2


@pytest.mark.parametrize("loss", ["bal_bce", "bal_ce"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_adjusting_for_the_prior_the_model_was_built_for_changes_nothing(loss: str, tau: float) -> None:
    assert prior_adjustment(COUNTS, loss, resolve_prior("uniform", COUNTS), tau=tau).abs().max() < 1e-6
    custom = [0.5, 0.3, 0.2]  # a loss built for another test prior: adjusting for that one is a no-op too
    assert prior_adjustment(COUNTS, loss, torch.tensor(custom), tau=tau, loss_test_prior=custom).abs().max() < 1e-6


def test_tau_scales_the_balanced_adjustment() -> None:
    prior = torch.tensor(FORWARD_4)
    one, two = prior_adjustment(COUNTS, "bal_bce", prior), prior_adjustment(COUNTS, "bal_bce", prior, tau=2.0)
    assert two.tolist() == pytest.approx((2 * one).tolist(), abs=1e-6)


def test_expected_accuracy_is_the_prior_weighted_per_class_accuracy() -> None:
    assert expected_accuracy([100.0, 50.0, 0.0], [0.5, 0.3, 0.2]) == pytest.approx(65.0)
    assert expected_accuracy([100.0, 50.0, None], [0.5, 0.3, 0.2]) == pytest.approx(65.0 / 0.8)  # renormalised
    assert expected_accuracy([None, None, None], [0.5, 0.3, 0.2]) is None


def test_prior_file(tmp_path) -> None:
    names = ["cat", "dog", "eel"]
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"cat": 3, "eel": 1}))
    assert resolve_prior(str(good), COUNTS, names).tolist() == pytest.approx([0.75, 0.0, 0.25])
    adj = prior_adjustment(COUNTS, "bal_ce", resolve_prior(str(good), COUNTS, names))
    assert torch.isfinite(adj).all() and int((torch.zeros(3) + adj).argmax()) == 0 and adj[1] < -20
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cat": 1, "cow": 2}))
    with pytest.raises(ValueError, match="unknown classes \\['cow'\\]"):
        resolve_prior(str(bad), COUNTS, names)
    bad.write_text(json.dumps({"cat": -1}))
    with pytest.raises(ValueError, match="weight of 'cat'"):
        resolve_prior(str(bad), COUNTS, names)
    with pytest.raises(ValueError, match="forward-R"):
        resolve_prior("sideways-3", COUNTS, names)


def test_accumulator_matches_the_logit_report_and_counts_adjusted_hits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 3, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    adjustments = torch.stack([prior_adjustment(COUNTS, "bal_bce", resolve_prior(p, COUNTS))
                               for p in ("uniform", "forward-4", "backward-4")])
    acc = EvalAccumulator(3, adjustments)
    for start in range(0, 50, 16):
        acc.update(logits[start:start + 16].bfloat16(), labels[start:start + 16])  # a bf16 model's output
    pred, confidence, gathered_labels, hits = acc.gather()
    assert pred.shape == confidence.shape == gathered_labels.shape == (50,)  # no [N, C] logits kept
    assert confidence.dtype == torch.float32
    z = logits.bfloat16().float()
    assert torch.equal(pred, z.argmax(1)) and torch.allclose(confidence, z.softmax(1).amax(1))
    for p in range(3):
        expect = torch.bincount(labels[(z + adjustments[p]).argmax(1) == labels], minlength=3)
        assert torch.equal(hits[p], expect), p
    assert torch.equal(hits[0], torch.bincount(labels[pred == labels], minlength=3))  # uniform: the raw hits
    report = classification_report(z, labels, COUNTS)
    assert report["top1"] == pytest.approx(100.0 * float((pred == labels).float().mean()))


def test_class_prior_follows_the_train_split() -> None:
    meta = {"num_classes": 3, "classes": ["a", "b", "c"], "class_counts": [6, 3, 1],
            "splits": {"train": {"class_counts": [6, 3, 1]}, "train_small": {"class_counts": [1, 3, 6]},
                       "val": {"class_counts": [2, 2, 2]}}}
    assert train_class_counts(meta, "train_small") == [1, 3, 6]
    with pytest.raises(ValueError, match="no class counts"):
        train_class_counts(meta, "holdout")
    recipe = load_recipe("configs/tiny_bft.yaml", ["data.train_split=train_small", "model.init="])
    task = FinetuneTask(recipe, meta)
    assert task.class_counts == [1, 3, 6]
    assert task.test_priors["forward-50"].argmax() == 2  # class 2 is the head of train_small
    assert torch.allclose(task.criterion.bias, logit_bias([1, 3, 6], "bce"))  # the loss's prior too
