"""Top-1, shot groups, per-class accuracy and ECE/MCE on constructed cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from livt_ds.metrics import calibration, classification_report, shot_groups

COUNTS = [500, 101, 100, 20, 19, 1]  # many: 0,1  medium: 2,3  few: 4,5


def _logits_for(pred: list[int], num_classes: int, margin: float = 20.0) -> torch.Tensor:
    z = torch.zeros(len(pred), num_classes)
    z[torch.arange(len(pred)), torch.tensor(pred)] = margin
    return z


def test_shot_groups_boundaries() -> None:
    assert shot_groups(COUNTS) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    assert shot_groups(torch.tensor([5, 5])) == {"many": [], "medium": [], "few": [0, 1]}


def test_shot_thresholds_have_one_home(monkeypatch) -> None:
    """metrics, the reports and the demo's design rule all group classes through longtail's one function."""
    from livt_ds import metrics, report
    from livt_ds.data import demo, longtail

    assert metrics.shot_groups is longtail.shot_groups is demo.shot_groups is report.shot_groups
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    monkeypatch.setattr(longtail, "MANY_SHOT", 200)  # class 1 (101 images) becomes medium-shot
    monkeypatch.setattr(longtail, "FEW_SHOT", 19)  # class 4 (19 images) becomes medium-shot
    report = classification_report(_logits_for([0, 1, 2, 3, 4, 0], 6), labels, COUNTS)
    assert report["group_classes"] == {"many": 1, "medium": 4, "few": 1}
    assert (report["many"], report["medium"], report["few"]) == (100.0, 100.0, 0.0)


def test_perfect_predictions() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 5])
    report = classification_report(_logits_for(labels.tolist(), 6), labels, COUNTS)
    for key in ("top1", "many", "medium", "few"):
        assert report[key] == pytest.approx(100.0)
    assert report["per_class"] == [100.0] * 6
    assert report["num_samples"] == 8
    assert report["ece"] < 1e-3 and report["mce"] < 1e-3  # confidence ~1, accuracy 1


def test_all_wrong_predictions() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    report = classification_report(_logits_for([(i + 1) % 6 for i in range(6)], 6), labels, COUNTS)
    for key in ("top1", "many", "medium", "few"):
        assert report[key] == 0.0
    assert report["per_class"] == [0.0] * 6
    assert report["ece"] == pytest.approx(100.0, abs=1e-3)  # confident (~1) and always wrong
    assert report["mce"] == pytest.approx(100.0, abs=1e-3)


def test_group_accuracy_is_sample_level_and_missing_classes_are_none() -> None:
    # class 0 (many): 3 samples, 2 right; class 1 (many): 1 sample, wrong -> many = 2/4 = 50 % (not mean of 66.7, 0)
    labels = torch.tensor([0, 0, 0, 1, 4])
    preds = [0, 0, 2, 0, 4]
    report = classification_report(_logits_for(preds, 6), labels, COUNTS)
    assert report["many"] == pytest.approx(50.0)
    assert report["medium"] is None  # classes 2, 3 have no test samples
    assert report["few"] == pytest.approx(100.0)
    assert report["top1"] == pytest.approx(60.0)
    assert report["per_class"][0] == pytest.approx(200.0 / 3)
    assert report["per_class"][1] == 0.0
    assert report["per_class"][2] is None and report["per_class"][5] is None


def test_empty_group_without_classes_is_none() -> None:
    counts = [200, 300]  # only many-shot classes
    labels = torch.tensor([0, 1])
    report = classification_report(_logits_for([0, 1], 2), labels, counts)
    assert report["many"] == pytest.approx(100.0)
    assert report["medium"] is None and report["few"] is None
    assert report["group_classes"] == {"many": 2, "medium": 0, "few": 0}


def test_known_ece_by_hand() -> None:
    # two classes; logits (a, 0) give confidence sigmoid(|a|). Choose confidences 0.9, 0.9, 0.65, 0.65
    a9, a6 = math.log(0.9 / 0.1), math.log(0.65 / 0.35)
    logits = torch.tensor([[a9, 0.0], [a9, 0.0], [a6, 0.0], [a6, 0.0]])
    labels = torch.tensor([0, 1, 0, 0])  # bin 0.9: acc 0.5, bin 0.65: acc 1.0
    report = classification_report(logits, labels, [200, 10])
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.65| = 0.375 ; MCE = 0.4
    assert report["ece"] == pytest.approx(37.5, abs=1e-4)
    assert report["mce"] == pytest.approx(40.0, abs=1e-4)
    rel = report["reliability"]
    assert len(rel["bin_lower"]) == len(rel["count"]) == 15
    assert sum(rel["count"]) == 4
    b9 = 13  # (0.8667, 0.9333]
    b6 = 9  # (0.6, 0.6667]
    assert rel["count"][b9] == 2 and rel["count"][b6] == 2
    assert rel["confidence"][b9] == pytest.approx(0.9) and rel["accuracy"][b9] == pytest.approx(0.5)
    assert rel["confidence"][b6] == pytest.approx(0.65) and rel["accuracy"][b6] == pytest.approx(1.0)
    assert rel["confidence"][0] is None and rel["accuracy"][0] is None


def test_mce_is_max_gap_and_bins_upper_inclusive() -> None:
    conf = torch.tensor([0.2, 0.2, 1.0, 0.0], dtype=torch.float64)
    correct = torch.tensor([True, True, True, False])
    out = calibration(conf, correct, n_bins=5)
    # 0.2 sits in bin (0, 0.2] (index 0) with 0.0; 1.0 in the last bin
    assert out["reliability"]["count"] == [3, 0, 0, 0, 1]
    # bin 0: conf 0.4/3, acc 2/3 -> gap 0.4667; last: gap 0
    assert out["mce"] == pytest.approx(100 * (2 / 3 - 0.4 / 3), abs=1e-6)
    assert out["ece"] == pytest.approx(100 * 0.75 * (2 / 3 - 0.4 / 3), abs=1e-6)


def test_report_is_json_serialisable_and_validates() -> None:
    torch.manual_seed(0)
    logits = torch.randn(40, 6)
    labels = torch.randint(0, 6, (40,))
    report = classification_report(logits, labels, COUNTS)
    again = json.loads(json.dumps(report))
    assert again["top1"] == report["top1"] and isinstance(report["top1"], float)
    assert report["top1"] == pytest.approx(100.0 * float((logits.argmax(1) == labels).float().mean()))
    with pytest.raises(ValueError, match="classes"):
        classification_report(logits, labels, COUNTS[:5])
    with pytest.raises(ValueError, match="labels"):
        classification_report(logits, torch.full((40,), 6), COUNTS)
