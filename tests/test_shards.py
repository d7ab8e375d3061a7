"""Shard sets on disk: meta.json contract, --verify catching tampering, atomic writing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datafixtures import make_shard_set, memory_source, rewrite_tar

from livt_ds.data.make_shards import main, write_shards
from livt_ds.data.shards import load_meta, parse_shard_size, shard_paths, verify_shards
from livt_ds.data.sources import Record

REPO = Path(__file__).resolve().parents[1]


def test_load_meta_missing_says_what_to_run(tmp_path):
    hint = r"meta\.json: missing; run scripts/make_shards\.py --source .* --output"
    with pytest.raises(FileNotFoundError, match=hint):
        load_meta(tmp_path / "nothing")


def test_meta_contract_and_shard_paths(tmp_path):
    out = make_shard_set(tmp_path / "s", 10, 4, n_val=3)
    meta = load_meta(out)
    for key in ("format_version", "name", "num_classes", "classes", "class_counts", "splits", "image_stats", "mean",
                "std", "source", "command", "seed", "imbalance", "skipped", "created"):  # fmt: skip
        assert key in meta, key
    files = [out / f"train-00000{i}.tar" for i in range(3)]
    assert meta["splits"]["train"] == {
        "num_samples": 10,
        "shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"],
        "shard_sizes": [4, 4, 2],
        "class_counts": [3, 3, 2, 2],
        "shard_bytes": [f.stat().st_size for f in files],
        "shard_sha256": [hashlib.sha256(f.read_bytes()).hexdigest() for f in files],
    }
    assert shard_paths(out, "val") == [str(out / "val-000000.tar")]
    with pytest.raises(Exception, match="no split 'test'.*'train', 'val'"):
        shard_paths(out, "test")


@pytest.mark.parametrize(
    ("text", "expected"), [("1000", (1000, 3e9)), ("256MB", (10**12, 256e6)), ("1GiB", (10**12, 2**30))]
)
def test_parse_shard_size(text, expected):
    assert parse_shard_size(text) == expected


def test_parse_shard_size_rejects_nonsense():
    with pytest.raises(ValueError, match="--shard-size"):
        parse_shard_size("lots")


def test_verify_passes_then_catches_a_dropped_sample(tmp_path, capsys):
    out = make_shard_set(tmp_path / "s", 12, 5)
    assert main(["--verify", str(out), "--no-progress", "--workers", "1"]) == 0
    assert "OK" in capsys.readouterr().out
    first = out / "train-000001.tar"
    victim = next(n for n in __import__("tarfile").open(first).getnames() if n.endswith(".cls"))
    key = victim.split(".")[0]
    rewrite_tar(first, lambda name, data: None if name.startswith(key + ".") else data)
    assert main(["--verify", str(out), "--no-progress", "--workers", "2"]) == 1
    report = capsys.readouterr().out
    assert "train-000001.tar: 4 samples, meta.json says 5" in report and "class counts differ" in report


def test_verify_catches_corrupt_image_bytes_and_edited_meta(tmp_path):
    out = make_shard_set(tmp_path / "s", 8, 8)
    rewrite_tar(out / "train-000000.tar", lambda name, data: data[:20] if name == "train_00000003.png" else data)
    ok, lines = verify_shards(out, progress=False)
    assert not ok and any("train_00000003" in line for line in lines)

    out2 = make_shard_set(tmp_path / "s2", 8, 8)
    meta = json.loads((out2 / "meta.json").read_text())
    meta["splits"]["train"]["class_counts"][0] += 1
    (out2 / "meta.json").write_text(json.dumps(meta))
    ok, lines = verify_shards(out2, progress=False)
    assert not ok and any("class counts differ" in line for line in lines)


def test_failed_write_leaves_nothing_and_keeps_the_old_set(tmp_path):
    out = tmp_path / "s"
    source = memory_source(12)
    write_shards(source, out, shard_size="4", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    source.splits["train"].insert(7, Record(0, "broken-record"))  # neither path, bytes nor pixels: raises
    with pytest.raises(ValueError, match="broken-record"):
        write_shards(source, out, shard_size="4", progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set is intact
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no partial folder left behind
    with pytest.raises(ValueError):
        write_shards(source, tmp_path / "fresh", shard_size="4", progress=False)
    assert not (tmp_path / "fresh").exists()


def test_killed_run_never_looks_complete(tmp_path):
    """SIGKILL while writing (the writer blocks on a FIFO posing as an image): no complete-looking folder."""
    fifo = tmp_path / "stall.png"
    os.mkfifo(fifo)
    out = tmp_path / "shards" / "killed"
    driver = (
        f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from datafixtures import memory_source\n"
        "from livt_ds.data.make_shards import write_shards\n"
        "from livt_ds.data.sources import Record\n"
        "src = memory_source(40)\n"
        f"src.splits['train'].insert(30, Record(0, 'stall', path={str(fifo)!r}))\n"
        f"write_shards(src, {str(out)!r}, shard_size='5', progress=False, seed=0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.time() + 60
    while True:  # opening the FIFO for writing succeeds once make_shards is blocked reading it
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the writer never reached the stalled record"
            time.sleep(0.01)
    partial = list(out.parent.glob("killed.partial-*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.close(fd)
    assert len(partial) == 1 and list(partial[0].glob("train-*.tar")) and not (partial[0] / "meta.json").exists()
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="interrupted run left killed.partial-"):
        load_meta(out)
    write_shards(memory_source(40), out, shard_size="5", progress=False)  # a re-run clears the stale folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["killed"]
    assert load_meta(out)["splits"]["train"]["num_samples"] == 40
