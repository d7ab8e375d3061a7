"""Shard sets behind URLs: a real HTTP server on 127.0.0.1 (dropped connections, 404/500, stalls), pipe: and
fsspec locations, make_shards --output URL / --verify URL, the local cache; 2-rank training over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

import pytest
import torch
from conftest import launcher_env, make_image_folder, read_jsonl, run_livt, run_process, train_losses
from datafixtures import loader_position, make_shard_set
from httpserver import serve

from livt_ds.data.cache import cache_name, fetch
from livt_ds.data.make_shards import main as make_shards
from livt_ds.data.pipeline import eval_loader, skipped_shards, train_loader
from livt_ds.data.remote import RemoteOptions, open_url
from livt_ds.data.shards import load_meta, shard_paths
from livt_ds.data.transforms import pretrain_transform
from livt_ds.errors import ShardMissing, ShardUnavailable

MGP = pretrain_transform(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FAST = RemoteOptions(retries=3, backoff_s=0.01, timeout_s=10)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """``root/s`` (30 train samples in 6 shards of 5, 6 val in 2) and a copy ``root/broken``."""
    root = tmp_path_factory.mktemp("remote")
    make_shard_set(root / "s", 30, 5, n_val=6)
    shutil.copytree(root / "s", root / "broken")
    return root


def train_batches(location, remote=FAST, **kw):
    args = dict(transform=MGP, batch_size=4, num_workers=0, seed=3, epoch=0, rank=0, world_size=2, num_batches=6,
                shuffle_buffer=8, remote=remote) | kw  # fmt: skip
    return list(train_loader(location, loader_position(args), **args))


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- the opener
@pytest.mark.parametrize("ranges", [True, False])
def test_dropped_connections_resume_byte_exact(tmp_path, ranges):
    data = os.urandom(700_000)
    (tmp_path / "a.tar").write_bytes(data)
    with serve(tmp_path, drop_every=2, ranges=ranges) as srv:
        for _ in range(4):
            with open_url(f"{srv.url}/a.tar", FAST) as f:
                assert f.read() == data
        assert srv.drops == 3  # requests 2, 4 and 6 were cut mid-body; 3, 5 and 7 went on
        assert srv.range_requests == (3 if ranges else 0)


def test_errors_are_bounded_and_404_is_not_retried(tmp_path):
    (tmp_path / "ok.tar").write_bytes(b"x" * 100)
    with serve(tmp_path, fail={"/500.tar": 500, "/403.tar": 403}, stall=("/ok.tar",), stall_s=1.5) as srv:
        with pytest.raises(ShardUnavailable, match="gave up after 4 tries.*500"):
            open_url(f"{srv.url}/500.tar", FAST)
        with pytest.raises(ShardMissing, match="not found .HTTP 404"):
            open_url(f"{srv.url}/none.tar", FAST)
        with pytest.raises(ShardUnavailable, match="HTTP 403"):
            open_url(f"{srv.url}/403.tar", FAST)
        assert srv.requests["/500.tar"] == 4 and srv.requests["/none.tar"] == 1 and srv.requests["/403.tar"] == 1
        start = time.time()  # a stalled server: timeouts, then give up; never a hang
        with pytest.raises(ShardUnavailable, match="gave up after 2 tries"):
            open_url(f"{srv.url}/ok.tar", RemoteOptions(retries=1, backoff_s=0.01, timeout_s=0.3))
        assert time.time() - start < 1.5
    with serve(tmp_path, lifetime_s=0.2) as srv:  # a server past its lifetime refuses at once: no client waits
        time.sleep(0.5)
        with pytest.raises(ShardUnavailable, match="gave up after 4 tries"):
            open_url(f"{srv.url}/ok.tar", FAST)


def test_recipe_options_are_checked():
    from livt_ds.config import DataConfig
    from livt_ds.errors import ConfigError

    options = RemoteOptions.from_config(DataConfig(retries=2, cache_dir="/c", cache_max_gb=0.5))
    assert (options.retries, options.cache_dir, options.cache_max_bytes) == (2, "/c", 500_000_000)
    with pytest.raises(ConfigError, match="data.retries"):
        RemoteOptions.from_config(DataConfig(retries=-1))


# ---------------------------------------------------------------------------------------------- streams
def test_train_and_eval_streams_over_http_with_drops_equal_local(sets):
    local = sets / "s"
    before = skipped_shards()
    with serve(sets, drop_every=3) as srv:
        url = f"{srv.url}/s/"
        assert load_meta(url) == load_meta(local)
        assert shard_paths(url, "val") == [f"{srv.url}/s/val-000000.tar", f"{srv.url}/s/val-000001.tar"]
        for rank in range(2):
            assert same(train_batches(url, rank=rank), train_batches(local, rank=rank))
        resumed = train_batches(url, rank=1, num_workers=2, skip_batches=3)
        assert same(resumed, train_batches(local, rank=1, num_workers=2)[3:])
        keys = [k for rank in range(2) for *_, ks in eval_loader(url, transform=MGP, batch_size=4, num_workers=2,
                                                                 rank=rank, world_size=2, return_keys=True,
                                                                 remote=FAST) for k in ks]  # fmt: skip
        assert sorted(keys) == [f"val_{i:08d}" for i in range(6)]
        assert srv.drops >= 5
    assert skipped_shards() == before


def test_unreadable_shards_are_skipped_counted_and_ranks_stay_in_step(sets):
    fail = {"/broken/train-000001.tar": 500, "/broken/train-000004.tar": 404}
    before = skipped_shards()
    with serve(sets, fail=fail) as srv:
        runs = [train_batches(f"{srv.url}/broken", rank=rank, num_batches=8) for rank in range(2)]
        failing, missing = srv.requests["/broken/train-000001.tar"], srv.requests["/broken/train-000004.tar"]
    assert [len(r) for r in runs] == [8, 8] and all(x.shape[0] == 4 for r in runs for x, _ in r)
    # each visit of the 500 shard is 1 try + FAST.retries retries, each visit of the 404 shard one request (a
    # missing file is not retried), and every visit of either is one skipped shard, no more, no less
    assert failing > 0 and missing > 0 and failing % (1 + FAST.retries) == 0
    assert skipped_shards() - before == failing // (1 + FAST.retries) + missing


def test_a_set_with_no_readable_shard_fails_and_the_process_exits(sets, tmp_path):
    """All shards unreadable: a clear error, and the process ends (its loader workers ignore SIGTERM; an uncaught
    error must not leave the interpreter waiting for them at exit, which would hang every other rank too)."""
    (tmp_path / "dead").mkdir()
    shutil.copy(sets / "s" / "meta.json", tmp_path / "dead")
    code = ("from livt_ds.data.pipeline import train_loader\n"
            "from livt_ds.data.transforms import pretrain_transform\n"
            "from livt_ds.data.pipeline import StreamPosition\n"
            f"list(train_loader({str(tmp_path / 'dead')!r}, StreamPosition(0, 0, 0, 1, workers=1, batches=2), "
            "transform=pretrain_transform(16, (0.5,) * 3, (0.25,) * 3), batch_size=4))")  # fmt: skip
    result = run_process([sys.executable, "-c", code], env=launcher_env(), timeout=120)
    assert result.returncode == 1
    assert "shards in a row gave no sample" in result.stderr and "killed by signal" not in result.stderr


def test_pipe_and_fsspec_locations_read_the_same_stream(sets):
    local = sets / "s"
    expected = train_batches(local)
    assert same(train_batches(f"pipe:cat {local}/{{}}"), expected)
    assert same(train_batches(f"file://{local}"), expected)
    with pytest.raises(ValueError, match="needs {}"):
        load_meta(f"pipe:cat {local}/meta.json")
    with pytest.raises(FileNotFoundError, match="meta.json: not found.*make_shards"):
        load_meta("memory://nothing/here")


# ---------------------------------------------------------------------------------------------- writing, verify
def test_make_shards_uploads_meta_last_and_verify_reads_urls(sets, tmp_path, capsys):
    raw = make_image_folder(tmp_path / "raw", train_counts=(6, 3), val_per_class=2)
    common = ["--source", "imagefolder", "--input", str(raw), "--shard-size", "3", "--workers", "1", "--no-progress"]
    up = tmp_path / "bucket" / "set"
    up.mkdir(parents=True)
    order = tmp_path / "order.txt"
    assert make_shards([*common, "--output", f"pipe:cat > {up}/{{}} && echo {{}} >> {order}"]) == 0
    names = order.read_text().split()
    assert names[-1] == "meta.json" and len(names) == 1 + len(load_meta(up)["splits"]["train"]["shards"]) + 2
    assert load_meta(up)["name"] == "set"

    assert make_shards([*common, "--output", "memory://bucket/set2"]) == 0  # fsspec protocol (s3/gs go this way)
    assert make_shards(["--verify", "memory://bucket/set2", "--no-progress", "--workers", "1"]) == 0
    assert make_shards([*common, "--output", "memory://bucket/set2"]) == 2
    assert "already holds a shard set" in capsys.readouterr().err

    with serve(tmp_path / "bucket", drop_every=5, fail={"/set/train-000001.tar": 404}) as srv:
        assert make_shards(["--verify", f"{srv.url}/set", "--no-progress", "--workers", "2"]) == 1
        out = capsys.readouterr().out
        assert "train-000001.tar: listed in meta.json but missing" in out
        srv.fail.clear()
        assert make_shards(["--verify", f"{srv.url}/set", "--no-progress", "--workers", "2"]) == 0
        assert srv.drops > 0
    assert make_shards([*common, "--output", "https://example.invalid/set"]) == 2
    assert "not supported" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- cache
def test_cache_reads_each_shard_once_is_bounded_and_never_torn(sets, tmp_path):
    local = sets / "s"
    shard_bytes = (local / "train-000000.tar").stat().st_size
    with serve(sets, drop_every=4) as srv:
        url = f"{srv.url}/s"
        cached = RemoteOptions(retries=3, backoff_s=0.01, cache_dir=str(tmp_path / "c1"))
        first = train_batches(url, remote=cached, num_batches=10)
        tar_requests = srv.tar_requests
        assert same(train_batches(url, remote=cached, num_batches=10), first)  # later epochs: from disk
        assert srv.tar_requests == tar_requests
        assert same(first, train_batches(local, num_batches=10))

        bounded = RemoteOptions(retries=3, backoff_s=0.01, cache_dir=str(tmp_path / "c2"),
                                cache_max_bytes=int(2.5 * shard_bytes))  # fmt: skip
        train_batches(url, remote=bounded, num_batches=10)
        kept = list((tmp_path / "c2").iterdir())
        assert 1 <= len(kept) <= 2 and sum(p.stat().st_size for p in kept) <= 2.5 * shard_bytes

        # several ranks of one node fetching the same shard at once: complete files only, no temp left
        many = RemoteOptions(retries=5, backoff_s=0.01, cache_dir=str(tmp_path / "c3"))
        shard = f"{url}/train-000002.tar"
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(fetch(shard, many).read_bytes())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert results == [(local / "train-000002.tar").read_bytes()] * 4
    assert [p.name for p in (tmp_path / "c3").iterdir()] == [cache_name(shard)]


# ---------------------------------------------------------------------------------------------- 2-rank training
MGP_ARGS = ["--config", "configs/tiny_mgp.yaml", "--ds-config", "ds_configs/cpu_fp32.json", "train.epochs=2"]
RETRIES = 1  # data.retries of the run over the broken set


@pytest.fixture(scope="module")
def http_runs(toy_shards, pipeline_runs, tmp_path_factory):
    """The shared 2-rank MGP run from the local folder (``pipeline_runs/mgp``: this recipe), and the same over HTTP
    (every 4th shard request dropped mid-file) stopped at step 4 then resumed; and one over HTTP with a shard
    answering 500 and another 404."""
    out = tmp_path_factory.mktemp("http_runs")
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(toy_shards, root / toy_shards.name)
    shutil.copytree(toy_shards, root / "broken")
    fail = {"/broken/train-000001.tar": 500, "/broken/train-000002.tar": 404}
    shutil.copytree(pipeline_runs / "mgp", out / "local")
    with serve(root, drop_every=4, lifetime_s=1500) as srv:  # 2 launches: about 30 s on idle cores
        url = f"{srv.url}/{toy_shards.name}"
        http = [*MGP_ARGS, "--output", str(out / "http"), f"data.path={url}", "data.retry_backoff_s=0.05"]
        run_livt(["pretrain", *http, "train.stop_after_steps=4"])
        resumed = run_livt(["pretrain", *http, "--resume", "auto"])
        drops = srv.drops
    with serve(root, fail=fail, lifetime_s=1500) as srv:  # no drops here: each skipped read is a failing answer
        run_livt(["pretrain", *MGP_ARGS, "--output", str(out / "broken"), f"data.path={srv.url}/broken",
                  f"data.retries={RETRIES}", "data.retry_backoff_s=0.05", "train.epochs=1", "eval.every=0"])
        requests = dict(srv.requests)
    return {"out": out, "drops": drops, "requests": requests, "resumed_log": resumed.stdout + resumed.stderr}


@pytest.mark.slow
@pytest.mark.xdist_group("http_runs")
def test_two_rank_training_over_http_with_drops_and_resume_equals_local(http_runs):
    out = http_runs["out"]
    local, http = train_losses(out / "local"), train_losses(out / "http")
    assert sorted(local) == sorted(http) == list(range(1, 7))
    for step in local:
        assert http[step] == pytest.approx(local[step], rel=1e-5, abs=1e-6), step
    assert "resumed from" in http_runs["resumed_log"]
    assert http_runs["drops"] >= 3  # connections really dropped mid-file, and were resumed
    evals = [json.loads((out / run / "metrics.json").read_text()) for run in ("local", "http")]
    assert evals[1]["recon_loss"] == pytest.approx(evals[0]["recon_loss"], rel=1e-5)  # evaluated over HTTP too
    records = [r for r in read_jsonl(out / "http" / "metrics.jsonl") if "loss" in r]
    assert all(r["data/skipped_shards"] == 0 and r["data/skipped_samples"] == 0 for r in records)


@pytest.mark.slow
@pytest.mark.xdist_group("http_runs")
def test_two_rank_training_skips_and_counts_unreadable_shards(http_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = http_runs["out"] / "broken"
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]  # every rank ran its batches: no hang, no rank out of step
    # every visit of the 500 shard: 1 + RETRIES requests; of the 404 shard: 1 (not retried); each one skipped shard,
    # summed over both ranks
    failing, missing = (http_runs["requests"][f"/broken/train-00000{i}.tar"] for i in (1, 2))
    assert failing > 0 and missing > 0 and failing % (1 + RETRIES) == 0
    assert records[-1]["data/skipped_shards"] == failing // (1 + RETRIES) + missing
    (events,) = (run / "tensorboard").glob("events.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert acc.Scalars("data/skipped_shards")[-1].value == records[-1]["data/skipped_shards"]
    assert "data/skipped_samples" in acc.Tags()["scalars"]
