"""Three splits: make_shards writes a test split (ROOT/test, --test-list, CIFAR's official test with a val carved
from train) and meta.json names the split that is the test set (iNat18: val)."""

from __future__ import annotations

import json
from pathlib import Path

from datafixtures import make_cifar10, make_imagefolder, make_inat, make_list_source, write_image

from livt_ds.data.make_shards import main
from livt_ds.data.shards import load_meta, read_tar_samples, shard_paths, verify_shards


def run(*args: str) -> int:
    return main([*args, "--no-progress", "--workers", "1"])


def sources_of(out: Path, split: str) -> list[str]:
    return [json.loads(s["json"])["src"] for url in shard_paths(out, split) for s in read_tar_samples(url)]


def test_imagefolder_writes_val_and_test(tmp_path):
    raw = make_imagefolder(tmp_path / "raw", {"a": (4, 2), "b": (3, 1)})
    for i in range(3):
        write_image(raw / "test" / ("a" if i else "b") / f"t{i}.jpg", 500 + i)
    out = tmp_path / "out"
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out)) == 0
    meta = load_meta(out)
    assert sorted(meta["splits"]) == ["test", "train", "val"] and meta["test_split"] == "test"
    assert meta["splits"]["val"]["class_counts"] == [2, 1] and meta["splits"]["test"]["class_counts"] == [2, 1]
    assert sorted(sources_of(out, "test")) == ["test/a/t1.jpg", "test/a/t2.jpg", "test/b/t0.jpg"]
    assert verify_shards(out, progress=False)[0]


def test_imagefolder_test_is_not_a_stand_in_for_val(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "train" / "a" / "0.jpg", 1)
    write_image(raw / "train" / "b" / "0.jpg", 2)
    write_image(raw / "test" / "b" / "0.jpg", 3)
    out = tmp_path / "out"
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out)) == 0
    meta = load_meta(out)
    assert sorted(meta["splits"]) == ["test", "train"] and meta["test_split"] == "test"


def test_list_source_test_list(tmp_path, capsys):
    rows = {"train": [(f"train/n{c}/x{i}.jpg", c) for c in range(2) for i in range(3)],
            "val": [("val/v0.jpg", 0), ("val/v1.jpg", 1)],
            "test": [("test/t0.jpg", 1), ("test/t1.jpg", 1), ("test/t2.jpg", 0)]}
    lists = make_list_source(tmp_path, rows)
    out = tmp_path / "out"
    assert run("--source", "list", "--input", str(tmp_path / "images"), "--train-list", str(lists["train"]),
               "--val-list", str(lists["val"]), "--test-list", str(lists["test"]), "--output", str(out)) == 0
    meta = load_meta(out)
    assert meta["test_split"] == "test" and meta["splits"]["test"]["class_counts"] == [1, 2]
    assert meta["source_args"]["test_list"] == str(lists["test"].resolve())
    assert "test split: test" in capsys.readouterr().out
    no_test = tmp_path / "no_test"
    assert run("--source", "list", "--input", str(tmp_path / "images"), "--train-list", str(lists["train"]),
               "--val-list", str(lists["val"]), "--output", str(no_test)) == 0
    assert load_meta(no_test)["test_split"] is None and "test" not in load_meta(no_test)["splits"]


def test_inat_meta_says_test_is_val(tmp_path):
    files = make_inat(tmp_path, cat_ids=[0, 1], per_class={"train": 2, "val": 1})
    out = tmp_path / "inat"
    assert run("--source", "inat", "--input", str(tmp_path / "images"), "--train-list", str(files["train"]),
               "--val-list", str(files["val"]), "--output", str(out)) == 0
    meta = load_meta(out)
    assert meta["test_split"] == "val" and "test" not in meta["splits"]


def test_cifar_val_carved_from_train_and_official_test_as_test(tmp_path):
    raw = make_cifar10(tmp_path / "cifar-10-batches-py", per_class_train=20, per_class_test=3)
    out = tmp_path / "c10"
    assert run("--source", "cifar", "--input", str(raw), "--output", str(out), "--val-per-class", "4",
               "--imbalance", "8") == 0
    meta = load_meta(out)
    assert meta["test_split"] == "test"
    assert meta["splits"]["val"]["class_counts"] == [4] * 10
    assert meta["splits"]["test"]["class_counts"] == [3] * 10
    assert meta["class_counts"][0] == 16 and meta["class_counts"][-1] == 2  # the profile over the 16 left
    train, val, test = (set(sources_of(out, s)) for s in ("train", "val", "test"))
    assert not train & val  # the val images are no longer training images
    assert all(name.startswith("data_batch") for name in val) and all(name.startswith("test_batch") for name in test)
    plain = tmp_path / "plain"
    assert run("--source", "cifar", "--input", str(raw), "--output", str(plain)) == 0
    meta = load_meta(plain)
    assert meta["test_split"] == "val" and meta["splits"]["val"]["class_counts"] == [3] * 10


def test_split_options_refused_where_they_do_not_apply(tmp_path, capsys):
    raw = make_imagefolder(tmp_path / "raw", {"a": (2, 1), "b": (2, 1)})
    listed = tmp_path / "t.txt"
    listed.write_text("a/0.jpg 0\n")
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(tmp_path / "o"),
               "--test-list", str(listed)) == 2
    assert "ROOT/test" in capsys.readouterr().err
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(tmp_path / "o"),
               "--val-per-class", "1") == 2
    assert "--source cifar" in capsys.readouterr().err
    c10 = make_cifar10(tmp_path / "c10", per_class_train=3, per_class_test=1)
    assert run("--source", "cifar", "--input", str(c10), "--output", str(tmp_path / "o"), "--val-per-class", "3") == 2
    assert "smaller N" in capsys.readouterr().err
