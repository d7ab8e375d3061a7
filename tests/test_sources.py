"""make_shards from every source format: counts, labels, bad input, --imbalance, --max-side, determinism."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from datafixtures import (
    image_bytes,
    make_cifar10,
    make_cifar100,
    make_imagefolder,
    make_inat,
    make_list_source,
    write_corrupt,
    write_image,
)
from PIL import Image

from livt_ds.data.longtail import exponential_profile, longtail_subsample, longtail_targets, shot_groups
from livt_ds.data.make_shards import main
from livt_ds.data.shards import load_meta, read_tar_samples, shard_paths, verify_shards


def run(*args: str) -> int:
    return main([*args, "--no-progress", "--workers", "1"])


def stored(shard_dir: Path, split: str) -> list[dict]:
    """Every raw sample of a split, in shard order."""
    return [s for url in shard_paths(shard_dir, split) for s in read_tar_samples(url)]


def test_imagefolder_counts_corrupt_file_and_shard_sizes(tmp_path):
    raw = make_imagefolder(tmp_path / "raw", {"cat": (5, 2), "ant": (3, 2), "dog": (2, 2)})
    write_corrupt(raw / "train" / "dog" / "broken.jpg")
    (raw / "train" / "cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "shards" / "folder"
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out), "--shard-size", "4") == 0
    meta = load_meta(out)
    assert meta["classes"] == ["ant", "cat", "dog"]  # sorted class names
    assert meta["class_counts"] == [3, 5, 2]  # the corrupt dog image is skipped, not counted
    assert meta["splits"]["train"]["shard_sizes"] == [4, 4, 2]
    assert meta["splits"]["val"]["class_counts"] == [2, 2, 2]
    assert [s["path"].endswith("broken.jpg") and s["reason"].startswith("cannot decode") for s in meta["skipped"]] == [
        True
    ]
    samples = stored(out, "train")
    assert len(samples) == 10 and all("." not in s["__key__"] and "jpg" in s for s in samples)
    by_src = {json.loads(s["json"])["src"]: int(s["cls"]) for s in samples}
    assert by_src["train/ant/img0.jpg"] == 0 and by_src["train/dog/img1.jpg"] == 2
    assert len(meta["mean"]) == 3 and all(0 < v < 1 for v in meta["mean"] + meta["std"])
    # recomputed from the stored training images (all 16x16, fewer than --stats-samples): per-channel mean and
    # population std over every pixel on the 0-1 scale
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), np.float64).reshape(-1, 3)
                             for s in samples]) / 255.0
    assert meta["mean"] == pytest.approx(pixels.mean(0).tolist(), abs=1e-6)
    assert meta["std"] == pytest.approx(pixels.std(0).tolist(), abs=1e-6)
    assert meta["image_stats"]["width"] == {"min": 16, "mean": 16.0, "max": 16}
    assert verify_shards(out, progress=False)[0]


def test_list_source_missing_files_fail_unless_skip_missing(tmp_path, capsys):
    rows = {"train": [(f"train/n{c}/x{i}.jpg", c) for c in range(3) for i in range(3)], "val": [("val/v0.jpg", 1)]}
    lists = make_list_source(tmp_path, rows)
    with open(lists["train"], "a") as f:
        f.write("train/n0/gone1.jpg 0\ntrain/n0/gone2.jpg 0\n")
    args = ["--source", "list", "--input", str(tmp_path / "images"), "--train-list", str(lists["train"]),
            "--val-list", str(lists["val"]), "--output", str(tmp_path / "out")]  # fmt: skip
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert "2 files" in err and "gone1.jpg" in err and "--skip-missing" in err
    assert not (tmp_path / "out").exists()
    assert run(*args, "--skip-missing") == 0
    meta = load_meta(tmp_path / "out")
    assert meta["class_counts"] == [3, 3, 3] and meta["splits"]["val"]["class_counts"] == [0, 1, 0]
    assert meta["classes"] == ["n0", "n1", "n2"]  # names from the image folders
    assert sorted(Path(s["path"]).name for s in meta["skipped"]) == ["gone1.jpg", "gone2.jpg"]


def test_list_source_label_out_of_range_is_an_error(tmp_path, capsys):
    lists = make_list_source(tmp_path, {"train": [("a/0.jpg", 0), ("b/1.jpg", 1)], "val": [("a/2.jpg", 5)]})
    code = run("--source", "list", "--input", str(tmp_path / "images"), "--train-list", str(lists["train"]),
               "--val-list", str(lists["val"]), "--output", str(tmp_path / "out"))  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "label 5" in err and "val.txt:1" in err and "--num-classes" in err


def test_inat_keeps_category_ids(tmp_path):
    files = make_inat(tmp_path, cat_ids=[2, 0, 1], per_class={"train": 2, "val": 1})
    out = tmp_path / "inat"
    code = run("--source", "inat", "--input", str(tmp_path / "images"), "--train-list", str(files["train"]),
               "--val-list", str(files["val"]), "--output", str(out))  # fmt: skip
    assert code == 0
    meta = load_meta(out)
    assert meta["classes"] == ["species_0", "species_1", "species_2"]
    for s in stored(out, "train") + stored(out, "val"):
        src = json.loads(s["json"])["src"]
        assert int(s["cls"]) == int(src.split("/cat")[1].split("/")[0])  # the JSON's category id, unchanged


def test_cifar10_imbalance_follows_the_profile_and_test_stays_balanced(tmp_path):
    raw = make_cifar10(tmp_path / "cifar-10-batches-py", per_class_train=20, per_class_test=3)
    out = tmp_path / "c10lt"
    assert run("--source", "cifar", "--input", str(raw), "--output", str(out), "--imbalance", "10") == 0
    meta = load_meta(out)
    assert meta["class_counts"] == exponential_profile(20, 10, 10) == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert meta["splits"]["val"]["class_counts"] == [3] * 10
    assert meta["imbalance"] == 10 and meta["classes"][:2] == ["c0", "c1"]
    assert {s["png"][:4] for s in stored(out, "train")} == {b"\x89PNG"}


def test_cifar100_layout(tmp_path):
    raw = make_cifar100(tmp_path / "c100", per_class_train=4, per_class_test=2)
    out = tmp_path / "c100s"
    assert run("--source", "cifar", "--input", str(tmp_path / "c100"), "--output", str(out)) == 0
    meta = load_meta(out)
    assert meta["classes"] == [f"fine{i}" for i in range(5)] and meta["class_counts"] == [4] * 5
    assert raw.exists() and meta["splits"]["val"]["num_samples"] == 10


def test_demo_source(tmp_path):
    from livt_ds.data.demo import DEMO_CLASSES, demo_class_counts

    out = tmp_path / "demo"
    assert main(["--source", "demo", "--output", str(out), "--workers", "2", "--no-progress"]) == 0
    meta = load_meta(out)
    assert meta["classes"] == DEMO_CLASSES and meta["class_counts"] == demo_class_counts("train")


def test_imbalance_on_any_source_orders_classes_by_count():
    labels = [0] * 3 + [1] * 10 + [2] * 6 + [3] * 8  # head is class 1, then 3, 2, 0
    assert longtail_targets([3, 10, 6, 8], gamma=5) == [2, 10, 3, 5]  # profile 10, 5, 3, 2 by rank
    kept = longtail_subsample(labels, 4, gamma=5, seed=3)
    assert [sum(labels[i] == c for i in kept) for c in range(4)] == [2, 10, 3, 5]
    assert kept == longtail_subsample(labels, 4, gamma=5, seed=3) != longtail_subsample(labels, 4, gamma=5, seed=4)
    assert shot_groups([150, 100, 20, 19]) == {"many": [0], "medium": [1, 2], "few": [3]}
    assert sum(exponential_profile(5000, 10, 100)) == 12406 and sum(exponential_profile(500, 100, 100)) == 10847


def test_imagefolder_imbalance_via_cli(tmp_path):
    raw = make_imagefolder(tmp_path / "raw", {"a": (8, 0), "b": (8, 0), "c": (8, 0)})
    out = tmp_path / "lt"
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out), "--imbalance", "4") == 0
    assert load_meta(out)["class_counts"] == [8, 4, 2]


def test_max_side_reencodes_large_images_only(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "train" / "a" / "big.jpg", 1, size=(64, 48))
    write_image(raw / "train" / "a" / "small.jpg", 2, size=(20, 10))
    write_image(raw / "train" / "b" / "big.png", 3, size=(40, 80))
    write_image(raw / "train" / "b" / "odd.bmp", 4, size=(8, 8))
    out = tmp_path / "resized"
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out), "--max-side", "32") == 0
    by_src = {json.loads(s["json"])["src"]: s for s in stored(out, "train")}
    big = by_src["train/a/big.jpg"]
    assert Image.open(__import__("io").BytesIO(big["jpg"])).size == (32, 24)
    assert json.loads(big["json"])["orig_size"] == [64, 48]
    assert by_src["train/a/small.jpg"]["jpg"] == (raw / "train/a/small.jpg").read_bytes()  # stored as it was
    assert Image.open(__import__("io").BytesIO(by_src["train/b/big.png"]["png"])).size == (16, 32)
    assert "png" in by_src["train/b/odd.bmp"]  # other formats: lossless PNG
    assert load_meta(out)["image_stats"]["resized"] == 2


def test_output_is_deterministic_whatever_the_workers(tmp_path):
    raw = make_imagefolder(tmp_path / "raw", {"a": (6, 1), "b": (5, 1)})
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert main(["--source", "imagefolder", "--input", str(raw), "--output", str(out), "--shard-size", "4",
                     "--workers", workers, "--no-progress", "--seed", "7"]) == 0  # fmt: skip
        outs.append(out)
    names = sorted(p.name for p in outs[0].glob("*.tar"))
    assert names == sorted(p.name for p in outs[1].glob("*.tar")) and len(names) == 4
    assert all((outs[0] / n).read_bytes() == (outs[1] / n).read_bytes() for n in names)


def test_empty_source_and_foreign_output_are_errors(tmp_path, capsys):
    raw = make_imagefolder(tmp_path / "raw", {"a": (2, 0), "b": (1, 0)})
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    assert run("--source", "imagefolder", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "x")) == 2
    assert "no training images" in capsys.readouterr().err

    out = tmp_path / "set"
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out)) == 0
    created = load_meta(out)["created"]
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    other = make_imagefolder(tmp_path / "raw2", {"z": (2, 0), "y": (2, 0)})
    assert run("--source", "imagefolder", "--input", str(other), "--output", str(out), "--overwrite") == 2
    assert "another data set" in capsys.readouterr().err
    assert load_meta(out)["created"] == created and load_meta(out)["class_counts"] == [2, 1]  # untouched
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out), "--overwrite") == 0

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(junk)) == 2
    assert "not a shard set" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_bytes_are_stored_unchanged(tmp_path, fmt):
    ext = ".png" if fmt == "PNG" else ".jpg"
    raw = tmp_path / "raw"
    (raw / "train" / "a").mkdir(parents=True)
    data = image_bytes(5, (24, 16), fmt)
    (raw / "train" / "a" / f"x{ext}").write_bytes(data)
    out = tmp_path / "o"
    assert run("--source", "imagefolder", "--input", str(raw), "--output", str(out)) == 0
    (sample,) = stored(out, "train")
    assert sample[ext[1:]] == data
