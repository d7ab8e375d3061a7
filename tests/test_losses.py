"""CE / Bal-CE / BCE / Bal-BCE against hand-computed values, soft vs hard targets, bf16 stability."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from livt_ds.losses import HARD_LABEL_LOSSES, LOSS_NAMES, build_loss, logit_bias

COUNTS = [60, 30, 10]  # N = 100, pi = (0.6, 0.3, 0.1)


def test_bce_bias_matches_eq10_by_hand() -> None:
    b = logit_bias(COUNTS, "bce")
    log_c1 = math.log(2)  # log(C - 1), C = 3
    expected = [
        math.log(0.6) - math.log(0.4) + log_c1,
        math.log(0.3) - math.log(0.7) + log_c1,
        math.log(0.1) - math.log(0.9) + log_c1,
    ]
    assert b.dtype == torch.float32
    assert b.tolist() == pytest.approx(expected, abs=1e-6)


def test_ce_bias_by_hand_and_tau() -> None:
    b = logit_bias(COUNTS, "ce", tau=0.5)
    expected = [0.5 * (math.log(p) - math.log(1 / 3)) for p in (0.6, 0.3, 0.1)]
    assert b.tolist() == pytest.approx(expected, abs=1e-6)


def test_bias_with_non_uniform_test_prior_by_hand() -> None:
    prior_t = [0.5, 0.25, 0.25]
    b = logit_bias(COUNTS, "bce", test_prior=prior_t)
    expected = [
        (math.log(p) - math.log(q)) - (math.log(1 - p) - math.log(1 - q))
        for p, q in zip((0.6, 0.3, 0.1), prior_t, strict=True)
    ]
    assert b.tolist() == pytest.approx(expected, abs=1e-6)
    # a test prior equal to the training prior cancels the bias entirely
    assert logit_bias(COUNTS, "bce", test_prior=[0.6, 0.3, 0.1]).abs().max() < 1e-6
    assert logit_bias(COUNTS, "ce", test_prior=[0.6, 0.3, 0.1]).abs().max() < 1e-6


def test_losses_by_hand_for_one_sample() -> None:
    z = torch.tensor([[1.0, -0.5, 0.25]])
    y = torch.tensor([2])
    bias = logit_bias(COUNTS, "bce")
    zb = (z + bias)[0].tolist()

    def sp(x: float) -> float:  # softplus = -log sigmoid(-x)
        return math.log1p(math.exp(x))

    bal_bce = sp(-zb[2]) + sp(zb[0]) + sp(zb[1])  # -log s(z_y) - sum_{c != y} log(1 - s(z_c))
    assert build_loss("bal_bce", COUNTS)(z, y).item() == pytest.approx(bal_bce, rel=1e-5)
    zl = z[0].tolist()
    assert build_loss("bce")(z, y).item() == pytest.approx(sp(-zl[2]) + sp(zl[0]) + sp(zl[1]), rel=1e-5)
    zc = [v + math.log(p) for v, p in zip(zl, (0.6, 0.3, 0.1), strict=True)]
    bal_ce = -zc[2] + math.log(sum(math.exp(v) for v in zc))
    assert build_loss("bal_ce", COUNTS)(z, y).item() == pytest.approx(bal_ce, rel=1e-5)
    ce = -zl[2] + math.log(sum(math.exp(v) for v in zl))
    assert build_loss("ce")(z, y).item() == pytest.approx(ce, rel=1e-5)


@pytest.mark.parametrize("num_classes", [2, 4, 10])
def test_bal_bce_with_balanced_prior_is_bce_on_constant_shift(num_classes: int) -> None:
    counts = [25] * num_classes
    bias = logit_bias(counts, "bce", tau=2.0)
    # constant across classes: log(1/C) - log(1 - 1/C) = -log(C - 1), which Eq. 10's + log(C - 1) cancels
    assert torch.allclose(bias, bias[0].expand(num_classes))
    assert bias[0].item() == pytest.approx(2.0 * (-math.log(num_classes - 1) + math.log(num_classes - 1)), abs=1e-6)
    torch.manual_seed(0)
    z = torch.randn(6, num_classes)
    y = torch.randint(0, num_classes, (6,))
    onehot = F.one_hot(y, num_classes).float()
    manual = F.binary_cross_entropy_with_logits(z + bias[0], onehot, reduction="none").sum(1).mean()
    bal = build_loss("bal_bce", counts, tau=2.0)(z, y)
    assert bal.item() == pytest.approx(manual.item(), rel=1e-6)
    assert bal.item() == pytest.approx(build_loss("bce")(z, y).item(), rel=1e-6)


def test_bal_bce_equals_bce_of_shifted_logits_long_tail() -> None:
    torch.manual_seed(1)
    z = torch.randn(5, 3)
    y = torch.randint(0, 3, (5,))
    shifted = z + logit_bias(COUNTS, "bce")
    assert build_loss("bal_bce", COUNTS)(z, y).item() == pytest.approx(build_loss("bce")(shifted, y).item(), rel=1e-6)
    assert build_loss("bal_ce", COUNTS)(z, y).item() != pytest.approx(build_loss("ce")(z, y).item(), rel=1e-3)


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n not in HARD_LABEL_LOSSES])
def test_soft_and_hard_targets_agree(name: str) -> None:
    torch.manual_seed(2)
    z = torch.randn(7, 3) * 3
    y = torch.randint(0, 3, (7,))
    loss = build_loss(name, COUNTS)
    hard = loss(z, y)
    soft = loss(z, F.one_hot(y, 3).float())
    assert hard.dim() == 0 and hard.dtype == torch.float32
    assert hard.item() == pytest.approx(soft.item(), rel=1e-6)
    # a genuinely soft target (mixup-like) gives a different value
    mixed = 0.5 * F.one_hot(y, 3).float() + 0.5 * F.one_hot((y + 1) % 3, 3).float()
    assert loss(z, mixed).item() != pytest.approx(hard.item(), rel=1e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_finite_gradients_under_bf16_autocast_with_extreme_prior(name: str) -> None:
    num_classes = 50
    counts = [max(1, int(1000 * 1000 ** (-i / (num_classes - 1)))) for i in range(num_classes)]  # gamma 1000
    loss_fn = build_loss(name, counts)
    torch.manual_seed(3)
    layer = torch.nn.Linear(16, num_classes)
    x = torch.randn(8, 16) * 30
    y = torch.randint(0, num_classes, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bias_never_changes_callers_logits(name: str) -> None:
    z = torch.randn(4, 3)
    before = z.clone()
    loss_fn = build_loss(name, COUNTS)
    loss_fn(z, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(z, before)
    if name.startswith("bal_"):
        assert loss_fn.bias is not None and loss_fn.bias.shape == (3,)
        assert "bias" in dict(loss_fn.named_buffers())
    elif name in ("ce", "bce"):
        assert loss_fn.bias is None


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="valid names"):
        build_loss("poly")
    with pytest.raises(ValueError, match="class_counts"):
        build_loss("bal_bce")
    with pytest.raises(ValueError, match="> 0"):
        logit_bias([10, 0, 5], "bce")
    with pytest.raises(ValueError, match="at least 2"):
        logit_bias([10], "ce")
    with pytest.raises(ValueError, match="sum to 1"):
        logit_bias([10, 5], "bce", test_prior=[0.5, 0.6])
    with pytest.raises(ValueError, match="entries"):
        logit_bias([10, 5], "bce", test_prior=[1.0])
    with pytest.raises(ValueError, match="kind"):
        logit_bias([10, 5], "softmax")
    with pytest.raises(ValueError, match="shape"):
        build_loss("bce")(torch.zeros(2, 3), torch.zeros(2, 4))
