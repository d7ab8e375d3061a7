"""The test split is read once: which split it is (meta.json, data.test_split), and the end-of-run evaluation of the
checkpoint chosen on val and of the last one, which `livt eval --split test` reproduces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import BFT_ARGS, make_image_folder, read_jsonl, run_livt

from livt_ds.config import ConfigError, load_recipe
from livt_ds.data.make_shards import main as make_shards
from livt_ds.test_split import resolve_test_split

TEST_PER_CLASS = 3  # val has 5 per class (conftest), so a metrics file tells which split it read


def _meta(splits: list[str], **extra) -> dict:
    return {"splits": {s: {"num_samples": 1} for s in splits}, **extra}


def test_resolve_test_split() -> None:
    auto = load_recipe(None, ["data.path=x"])
    assert resolve_test_split(auto, _meta(["train", "val", "test"], test_split="test")) == "test"
    assert resolve_test_split(auto, _meta(["train", "val", "test"])) == "test"  # a meta.json from before test_split
    assert resolve_test_split(auto, _meta(["train", "val"], test_split="val")) == "val"  # iNat18: test = val
    assert resolve_test_split(auto, _meta(["train", "val"], test_split=None)) is None
    assert resolve_test_split(auto, _meta(["train", "val"])) is None
    off = load_recipe(None, ["data.test_split=null"])
    assert resolve_test_split(off, _meta(["train", "val", "test"])) is None
    with pytest.raises(ConfigError, match="no such split"):
        resolve_test_split(load_recipe(None, ["data.test_split=holdout"]), _meta(["train", "val"]))
    with pytest.raises(ConfigError, match="chosen on test"):
        resolve_test_split(load_recipe(None, ["data.eval_split=test"]), _meta(["train", "val", "test"]))


@pytest.fixture(scope="module")
def three_split_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three")
    make_image_folder(root / "raw")
    make_image_folder(root / "held", train_counts=(0, 0, 0, 0), val_per_class=TEST_PER_CLASS, seed=7)
    shutil.move(root / "held" / "val", root / "raw" / "test")
    out = root / "shards"
    assert make_shards(["--source", "imagefolder", "--input", str(root / "raw"), "--output", str(out),
                        "--workers", "1", "--no-progress"]) == 0
    return out


def test_finetune_reads_test_once_at_the_end_and_livt_eval_reproduces_it(three_split_shards, tmp_path) -> None:
    run = tmp_path / "ldam"
    hard_labels = ["augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0"]
    result = run_livt(["finetune", *BFT_ARGS, "--output", str(run), f"data.path={three_split_shards}", "model.init=",
                       "loss.name=ldam", "loss.scale=5", *hard_labels])
    console = result.stdout + result.stderr
    assert console.count("LDAM-DRW re-weights") == 1 and "epoch 1: LDAM-DRW" in console  # 80 % of 2 epochs
    record = json.loads((run / "test_metrics.json").read_text())
    assert record["split"] == "test" and record["eval_split"] == "val"
    for name in ("best_on_val", "last"):
        m = record[name]
        assert m["num_samples"] == 4 * TEST_PER_CLASS
        assert {"top1", "many", "medium", "few", "ece", "per_class", "checkpoint"} <= set(m)
    assert record["last"]["checkpoint"] == "step00000006"  # 2 epochs x 3 steps
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/top1" in r]
    assert len(evals) == 2 and all(r["eval/num_samples"] == 20 for r in evals)  # training evaluated val only
    best_step = max(evals, key=lambda r: (r["eval/top1"], -r["step"]))["step"]
    assert record["best_on_val"]["checkpoint"] == f"step{best_step:08d}"
    assert json.loads((run / "metrics.json").read_text())["num_samples"] == 20
    assert "test split 'test', read once" in console
    # `livt eval --split test` on the checkpoint chosen on val gives the numbers of test_metrics.json
    tag = record["best_on_val"]["checkpoint"]
    again = tmp_path / "eval"
    run_livt(["eval", *BFT_ARGS, "--output", str(again), f"data.path={three_split_shards}",
              f"model.init={run / 'checkpoints' / tag}", "--split", "test", *hard_labels], ranks=0)
    metrics = json.loads((again / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_samples"] == 4 * TEST_PER_CLASS
    assert metrics["per_class"] == record["best_on_val"]["per_class"]
    assert metrics["top1"] == pytest.approx(record["best_on_val"]["top1"])
