"""Focal, class-balanced CE / focal and LDAM-DRW against values computed by hand from their formulas; soft targets,
the recipe keys and the test-time prior adjustment of these losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from livt_ds.config import ConfigError, load_recipe
from livt_ds.losses import build_loss, class_balanced_weights, default_drw_epoch, ldam_margins
from livt_ds.priors import prior_adjustment
from livt_ds.tasks import FinetuneTask

COUNTS = [60, 30, 10]
LOGITS = [[2.0, 0.5, -1.0], [0.2, 1.5, 0.3], [-0.5, 0.0, 1.0], [1.0, 1.0, 1.0]]
LABELS = [0, 2, 2, 1]


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _cb_weights(beta: float) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    return [w * len(COUNTS) / sum(raw) for w in raw]


def _focal_terms(gamma: float) -> list[float]:
    terms = []
    for row, y in zip(LOGITS, LABELS, strict=True):
        p = _softmax(row)[y]
        terms.append(-((1 - p) ** gamma) * math.log(p))
    return terms


def _z_y() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LOGITS), torch.tensor(LABELS)


def test_focal_is_the_mean_of_its_formula() -> None:
    z, y = _z_y()
    expected = sum(_focal_terms(2.0)) / len(LABELS)
    assert build_loss("focal")(z, y).item() == pytest.approx(expected, rel=1e-6)
    assert build_loss("focal", gamma=0.5)(z, y).item() == pytest.approx(sum(_focal_terms(0.5)) / 4, rel=1e-6)
    assert build_loss("focal", gamma=0.0)(z, y).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)


def test_class_balanced_weights_by_hand() -> None:
    for beta in (0.9, 0.99, 0.9999):
        assert class_balanced_weights(COUNTS, beta).tolist() == pytest.approx(_cb_weights(beta), rel=1e-5)
    assert class_balanced_weights(COUNTS, 0.0).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights(COUNTS, 1.0)


def test_cb_ce_is_weighted_cross_entropy_by_hand() -> None:
    z, y = _z_y()
    w = _cb_weights(0.9)
    ce_terms = _focal_terms(0.0)
    expected = sum(w[t] * c for t, c in zip(LABELS, ce_terms, strict=True)) / sum(w[t] for t in LABELS)
    loss = build_loss("cb_ce", COUNTS, beta=0.9)
    assert loss(z, y).item() == pytest.approx(expected, rel=1e-6)
    assert loss(z, y).item() != pytest.approx(F.cross_entropy(z, y).item(), rel=1e-3)
    assert loss(z, F.one_hot(y, 3).float()).item() == pytest.approx(expected, rel=1e-6)  # soft one-hot: same value


def test_cb_focal_by_hand() -> None:
    z, y = _z_y()
    w = _cb_weights(0.99)
    terms = _focal_terms(2.0)
    expected = sum(w[t] * c for t, c in zip(LABELS, terms, strict=True)) / sum(w[t] for t in LABELS)
    loss = build_loss("cb_focal", COUNTS, beta=0.99, gamma=2.0)
    assert loss(z, y).item() == pytest.approx(expected, rel=1e-6)
    assert loss(z, F.one_hot(y, 3).float()).item() == pytest.approx(expected, rel=1e-6)


def test_focal_soft_targets_are_the_target_weighted_terms() -> None:
    z = torch.tensor(LOGITS[:1])
    target = torch.tensor([[0.7, 0.3, 0.0]])
    p = _softmax(LOGITS[0])
    expected = -sum(t * (1 - q) ** 2 * math.log(q) for t, q in zip((0.7, 0.3, 0.0), p, strict=True))
    assert build_loss("focal")(z, target).item() == pytest.approx(expected, rel=1e-6)


def _ldam_by_hand(scale: float, max_margin: float, weights: list[float] | None) -> float:
    raw = [n**-0.25 for n in COUNTS]
    margins = [m * max_margin / max(raw) for m in raw]
    num = den = 0.0
    for row, y in zip(LOGITS, LABELS, strict=True):
        shifted = [scale * (v - (margins[y] if c == y else 0.0)) for c, v in enumerate(row)]
        w = 1.0 if weights is None else weights[y]
        num += -w * math.log(_softmax(shifted)[y])
        den += w
    return num / den


def test_ldam_margins_and_loss_by_hand_with_drw() -> None:
    raw = [n**-0.25 for n in COUNTS]
    assert ldam_margins(COUNTS, 0.5).tolist() == pytest.approx([0.5 * m / max(raw) for m in raw], rel=1e-6)
    z, y = _z_y()
    loss = build_loss("ldam", COUNTS, scale=30.0, max_margin=0.5, beta=0.999, drw_epoch=3)
    before = _ldam_by_hand(30.0, 0.5, None)
    after = _ldam_by_hand(30.0, 0.5, _cb_weights(0.999))
    assert before != pytest.approx(after, rel=1e-3)
    for epoch, expected in ((0, before), (2, before), (3, after), (7, after)):
        loss.set_epoch(epoch)
        assert loss(z, y).item() == pytest.approx(expected, rel=1e-5), epoch
    small = build_loss("ldam", COUNTS, scale=1.0, max_margin=0.2, drw_epoch=10)
    assert small(z, y).item() == pytest.approx(_ldam_by_hand(1.0, 0.2, None), rel=1e-6)


def test_ldam_refuses_soft_targets() -> None:
    z, y = _z_y()
    with pytest.raises(ValueError, match="augment.mixup=0"):
        build_loss("ldam", COUNTS)(z, F.one_hot(y, 3).float())


def test_recipe_keys_are_validated(tmp_path) -> None:
    recipe = load_recipe(None, ["loss.name=cb_focal", "loss.gamma=1", "loss.beta=0.99"])
    assert (recipe.loss.gamma, recipe.loss.beta, recipe.loss.drw_epoch) == (1.0, 0.99, None)
    for bad, match in (("loss.name=lda", "valid names"), ("loss.beta=1.0", "loss.beta"),
                       ("loss.gamma=-1", "loss.gamma"), ("loss.scale=0", "loss.scale"),
                       ("loss.drw_epoch=-2", "loss.drw_epoch")):
        with pytest.raises(ConfigError, match=match):
            load_recipe(None, [bad])
    with pytest.raises(ConfigError, match="augment.mixup=0 augment.cutmix=0 augment.label_smoothing=0"):
        load_recipe(None, ["loss.name=ldam"])
    hard = load_recipe(None, ["loss.name=ldam", "augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0"])
    assert hard.loss.name == "ldam"
    assert default_drw_epoch(200) == 160


def _meta() -> dict:
    return {"num_classes": 3, "classes": ["a", "b", "c"], "class_counts": COUNTS,
            "splits": {"train": {"num_samples": 100, "class_counts": COUNTS}}}


def test_finetune_task_builds_ldam_drw_from_the_recipe_and_passes_the_epoch() -> None:
    recipe = load_recipe(None, ["loss.name=ldam", "augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0",
                                "train.epochs=10", "loss.scale=5", "model.name=vit_tiny_test"])
    task = FinetuneTask(recipe, _meta())
    assert task.criterion.drw_epoch == 8  # 80 % of 10 epochs
    z, y = _z_y()
    for epoch, weights in ((7, None), (8, _cb_weights(0.9999))):
        task.set_epoch(epoch)
        assert task.criterion(z, y).item() == pytest.approx(_ldam_by_hand(5.0, 0.5, weights), rel=1e-5)


def test_prior_adjustment_of_the_new_losses_by_hand() -> None:
    pi = [n / 100 for n in COUNTS]
    pi_t = [0.5, 0.3, 0.2]
    w = _cb_weights(0.99)
    weighted = [a * b for a, b in zip(w, pi, strict=True)]
    expected_cb = [math.log(t) - math.log(q / sum(weighted)) for t, q in zip(pi_t, weighted, strict=True)]
    for name in ("cb_ce", "cb_focal", "ldam"):
        got = prior_adjustment(COUNTS, name, torch.tensor(pi_t, dtype=torch.float64), beta=0.99)
        assert got.tolist() == pytest.approx(expected_cb, abs=1e-5), name
    expected_plain = [math.log(t) - math.log(p) for t, p in zip(pi_t, pi, strict=True)]
    assert prior_adjustment(COUNTS, "focal", torch.tensor(pi_t)).tolist() == pytest.approx(expected_plain, abs=1e-5)
    no_drw = prior_adjustment(COUNTS, "ldam", torch.tensor(pi_t), beta=0.99, reweighted=False)
    assert no_drw.tolist() == pytest.approx(expected_plain, abs=1e-5)


def test_resuming_a_checkpoint_saved_before_the_new_keys_is_not_a_recipe_change() -> None:
    from livt_ds.config import recipe_to_dict
    from livt_ds.provenance import check_resume_recipe

    new = recipe_to_dict(load_recipe(None, ["data.path=x"]))
    old = {**new, "loss": {"name": "bal_bce", "tau": 1.0, "test_prior": None},
           "data": {k: v for k, v in new["data"].items() if k != "test_split"}}
    assert check_resume_recipe(old, new, allow=False, checkpoint="c", output="o") == {}
    with pytest.raises(ConfigError, match="loss.gamma: 2.0 -> 1.0"):
        changed = {**new, "loss": {**new["loss"], "gamma": 1.0}}
        check_resume_recipe(old, changed, allow=False, checkpoint="c", output="o")


def test_recipe_prior_adjustment_reads_the_loss_keys_and_whether_drw_ran() -> None:
    from livt_ds.config import recipe_to_dict
    from livt_ds.priors import recipe_prior_adjustment

    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    hard = ["augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0", "train.epochs=10"]
    ldam = recipe_to_dict(load_recipe(None, ["loss.name=ldam", "loss.beta=0.99", *hard]))
    assert torch.equal(recipe_prior_adjustment(COUNTS, ldam, prior),
                       prior_adjustment(COUNTS, "ldam", prior, beta=0.99, reweighted=True))
    no_drw = recipe_to_dict(load_recipe(None, ["loss.name=ldam", "loss.drw_epoch=10", *hard]))
    assert torch.equal(recipe_prior_adjustment(COUNTS, no_drw, prior), prior_adjustment(COUNTS, "focal", prior))
    bal = recipe_to_dict(load_recipe(None, ["loss.name=bal_ce", "loss.tau=0.5"]))
    assert torch.equal(recipe_prior_adjustment(COUNTS, bal, prior), prior_adjustment(COUNTS, "bal_ce", prior, tau=0.5))
