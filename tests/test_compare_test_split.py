"""livt_ds.compare shows the runs' test numbers (test_metrics.json) and the settings of the new losses."""

from __future__ import annotations

import json

import yaml
from test_compare import COUNTS, NAMES, _fake_run

from livt_ds import compare
from livt_ds.cli import main as cli_main


def _with_test(run, top1_best: float, top1_last: float) -> None:
    def metrics(top1: float) -> dict:
        return {"top1": top1, "many": top1 + 1, "medium": top1 - 1, "few": top1 - 2, "ece": 3.0, "num_samples": 60}

    (run / "test_metrics.json").write_text(json.dumps(
        {"split": "test", "best_on_val": {"checkpoint": "step00000010", **metrics(top1_best)},
         "last": {"checkpoint": "step00000015", **metrics(top1_last)}}))


def _set_loss(run, loss: dict) -> None:
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    recipe["loss"] = loss
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))


def test_compare_shows_test_numbers_and_new_loss_settings(tmp_path, capsys) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text(json.dumps({"num_classes": len(COUNTS), "classes": NAMES,
                                                  "class_counts": COUNTS}))
    ldam = [_fake_run(tmp_path, f"ldam{s}", 0.2, "ldam", s) for s in (0, 1)]
    focal = _fake_run(tmp_path, "focal", 0.5, "focal", 3)
    for run, seed in zip(ldam, (0, 1), strict=True):
        _set_loss(run, {"name": "ldam", "tau": 1.0, "gamma": 2.0, "beta": 0.9999, "max_margin": 0.5, "scale": 30.0,
                        "drw_epoch": None})
        recipe = yaml.safe_load((run / "config.yaml").read_text())
        recipe["train"]["seed"] = seed
        (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    _set_loss(focal, {"name": "focal", "tau": 1.0, "gamma": 2.0, "beta": 0.9999, "max_margin": 0.5, "scale": 30.0})
    _with_test(ldam[0], 50.0, 40.0)
    _with_test(ldam[1], 52.0, 44.0)
    out = tmp_path / "docs"
    assert compare.main([*map(str, ldam), str(focal), "--labels", "LDAM-DRW", "LDAM-DRW", "Focal",
                         "--output", str(out)]) == 0
    lines = (out / "loss_comparison.md").read_text().splitlines()
    assert "## Test split (read once)" in lines
    pm = "\u00b1"
    assert f"| LDAM-DRW | best on val | test | 51.0 {pm} 1.4 | 52.0 {pm} 1.4 | 50.0 {pm} 1.4 | 49.0 {pm} 1.4 | " \
           f"3.0 {pm} 0.0 |" in lines
    assert f"| LDAM-DRW | last | test | 42.0 {pm} 2.8 | 43.0 {pm} 2.8 | 41.0 {pm} 2.8 | 40.0 {pm} 2.8 | " \
           f"3.0 {pm} 0.0 |" in lines
    assert not any(line.startswith("| Focal | best on val") for line in lines)  # the focal run has no test numbers
    printed = capsys.readouterr().out
    assert "test split (read once)" in printed and "| LDAM-DRW | last | test | 42.0" in printed
    header = next(line for line in lines if line.startswith("| label | run | "))
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in lines if line.startswith("| Focal | `"))
    cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))
    assert (cells["loss"], cells["gamma"], cells["beta"], cells["tau"], cells["scale"]) == \
        ("focal", "2.0", "\u2013", "\u2013", "\u2013")
    row = next(line for line in lines if line.startswith("| LDAM-DRW | `"))
    cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))
    assert (cells["beta"], cells["margin"], cells["scale"], cells["gamma"]) == ("0.9999", "0.5", "30.0", "\u2013")
    assert cells["DRW epoch"] == "2 (default)"  # drw_epoch unset: 80 % of the fake runs' 3 epochs, rounded down


def test_livt_compare_without_test_numbers_has_no_test_section(tmp_path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text(json.dumps({"num_classes": len(COUNTS), "class_counts": COUNTS}))
    run = _fake_run(tmp_path, "ce", 1.0, "ce", 0)
    assert cli_main(["compare", str(run), "--output", str(tmp_path / "docs")]) == 0  # livt compare
    assert "Test split" not in (tmp_path / "docs" / "loss_comparison.md").read_text()
