"""Faults say what they are: one-line errors, atomic lock takeover, files with the user's umask, partial
evaluations, shard digests checked by the cache, predict on URLs and on nothing, a remote outage."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import REPO
from datafixtures import make_shard_set
from fsspec.implementations.memory import MemoryFileSystem
from httpserver import serve

from livt_ds.errors import RunLockedError
from livt_ds.provenance import RunLock


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


class SlowJudge(RunLock):
    """Takes its time deciding that a lock is stale: the window in which another launcher acts is wide."""

    def is_stale(self, holder: dict) -> bool:
        time.sleep(0.2)
        return super().is_stale(holder)


def _try_lock(folder: str, start, results) -> None:
    start.wait()
    try:
        SlowJudge(Path(folder)).acquire()  # never released: the winner holds it while the others try
        results.put(os.getpid())
    except RunLockedError:
        results.put(None)
    start.wait()  # every launcher has tried before any exits (an exited winner's lock would be stale again)


def test_two_launchers_taking_over_one_stale_lock_never_both_hold_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    launchers, dead = 4, _dead_pid()
    for round_ in range(3):
        folder = tmp_path / f"r{round_}"
        folder.mkdir()
        (folder / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead,
                                                     "started": "x"}))
        start, results = ctx.Barrier(launchers), ctx.Queue()
        procs = [ctx.Process(target=_try_lock, args=(str(folder), start, results)) for _ in range(launchers)]
        for p in procs:
            p.start()
        winners = [w for w in (results.get(timeout=60) for _ in procs) if w is not None]
        for p in procs:
            p.join(timeout=60)
        assert len(winners) == 1, f"round {round_}: {len(winners)} launchers hold the lock"
        assert json.loads((folder / "run.lock").read_text())["pid"] == winners[0]


def test_exported_weights_follow_the_umask(tmp_path):
    from livt_ds.hub import write_export

    old = os.umask(0o027)
    try:
        paths = write_export(tmp_path / "export", {"architecture": "x"}, {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == ["0o640", "0o640"]


# ---------------------------------------------------------------------------------------------- predict, CLI
@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_shard_set(root / "s", 12, 4, n_val=6)
    return root


@pytest.fixture(scope="module")
def tiny_export(sets, tmp_path_factory) -> Path:
    """An export of an (untrained) tiny classifier of 16-px images trained, by its record, on the classes of ``sets``:
    what predict and eval need, without a training run."""
    from livt_ds.config import load_recipe
    from livt_ds.hub import build_timm_model, hub_config, write_export

    recipe = load_recipe(REPO / "configs" / "tiny_bft.yaml", ["model.img_size=16", "model.patch_size=8"])
    meta = json.loads((sets / "s" / "meta.json").read_text())
    config = hub_config(recipe, "finetune", meta["classes"], meta["class_counts"], [0.5] * 3, [0.25] * 3)
    folder = tmp_path_factory.mktemp("export")
    write_export(folder, config, build_timm_model(config).state_dict())
    return folder


def cli(args: list[str], capsys) -> tuple[int, str]:
    from livt_ds.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def test_predict_reads_a_shard_set_url_like_data_path(sets, tiny_export, tmp_path):
    from livt_ds.predict import run_predict

    out = tmp_path / "preds.jsonl"
    with serve(sets) as srv:
        done = run_predict(str(tiny_export), [f"{srv.url}/s"], out, top_k=2, num_workers=0, progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert done["images"] == 6 and done["errors"] == 0
    assert all(line["path"].startswith(f"{srv.url}/s/val-") and len(line["top_k"]) == 2 for line in lines)


def test_predict_with_a_missing_input_or_nothing_readable_exits_2_in_one_line(tiny_export, tmp_path, capsys):
    base = ["predict", "--model", str(tiny_export), "--output", str(tmp_path / "p.jsonl"), "--workers", "0",
            "--no-progress"]
    code, err = cli([*base, "--input", str(tmp_path / "nowhere.png")], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "nowhere.png: no such file" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, err = cli([*base, "--input", str(tmp_path / "bad.png")], capsys)
    assert code == 2 and "no image could be read (1 unreadable" in err and "Traceback" not in err


class NoCredentialsError(Exception):
    """The name botocore gives the error of an s3 client that has no credentials."""


class _NoCredentialsFS(MemoryFileSystem):
    protocol = "nocreds"

    def _open(self, path, mode="rb", **kwargs):
        raise NoCredentialsError("Unable to locate credentials")


def test_shard_set_errors_and_missing_credentials_are_one_line_with_exit_2(sets, tiny_export, tmp_path, capsys):
    fsspec.register_implementation("nocreds", _NoCredentialsFS, clobber=True)
    base = ["predict", "--model", str(tiny_export), "--output", str(tmp_path / "p.jsonl"), "--input"]
    code, err = cli([*base, "nocreds://bucket/set"], capsys)
    assert code == 2 and "no usable credentials (NoCredentialsError" in err and err.count("\n") == 1
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "meta.json").write_text("{}")  # not a livt-ds shard set: ShardSetError
    code, err = cli([*base, f"file://{tmp_path / 'half'}/"], capsys)
    assert code == 2 and "not a livt-ds shard set" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- shard digests
def test_make_shards_records_each_shards_size_and_sha256(sets):
    from livt_ds.data.shards import file_sha256, load_meta

    meta = load_meta(sets / "s")
    for info in meta["splits"].values():
        files = [sets / "s" / name for name in info["shards"]]
        assert info["shard_bytes"] == [f.stat().st_size for f in files]
        assert info["shard_sha256"] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
        assert info["shard_sha256"][0] == file_sha256(files[0])


def test_the_cache_keeps_only_copies_that_match_meta_json_and_fetches_a_wrong_one_again(sets, tmp_path):
    from livt_ds.data.cache import fetch
    from livt_ds.data.remote import RemoteOptions
    from livt_ds.data.shards import load_meta, shard_files
    from livt_ds.errors import CachedCopyMismatch

    served = tmp_path / "served"
    shutil.copytree(sets / "s", served / "s")
    good = (served / "s" / "train-000001.tar").read_bytes()
    with serve(served) as srv:
        url = f"{srv.url}/s"
        options = RemoteOptions(retries=1, backoff_s=0.01, cache_dir=str(tmp_path / "c"))
        options = options.expecting(shard_files(url, load_meta(url)))
        shard = f"{url}/train-000001.tar"
        (served / "s" / "train-000001.tar").write_bytes(good[: len(good) // 2])  # the server's copy is broken
        with pytest.raises(CachedCopyMismatch, match="meta.json lists"):
            fetch(shard, options)
        assert not list((tmp_path / "c").iterdir())  # nothing cached
        (served / "s" / "train-000001.tar").write_bytes(good)  # fixed on the server: read at once
        assert fetch(shard, options).read_bytes() == good
        cached = fetch(shard, options)
        cached.write_bytes(good[:100])  # a copy cut short on disk is fetched again
        requests = srv.requests["/s/train-000001.tar"]
        assert fetch(shard, options).read_bytes() == good
        assert srv.requests["/s/train-000001.tar"] == requests + 1


def test_the_training_stream_reads_through_the_checked_cache(sets, tmp_path):
    from datafixtures import loader_position

    from livt_ds.data.pipeline import skipped_shards, train_loader
    from livt_ds.data.remote import RemoteOptions
    from livt_ds.data.transforms import pretrain_transform

    served = tmp_path / "served"
    shutil.copytree(sets / "s", served / "s")
    other = (served / "s" / "train-000002.tar").read_bytes()
    (served / "s" / "train-000000.tar").write_bytes(other)  # a valid tar, but not the file meta.json lists
    args = dict(transform=pretrain_transform(16, (0.5,) * 3, (0.25,) * 3), batch_size=4, num_workers=0, seed=0, epoch=0,
                rank=0, world_size=1, num_batches=3, shuffle_buffer=4,
                remote=RemoteOptions(retries=0, backoff_s=0.01, cache_dir=str(tmp_path / "c")))
    before = skipped_shards()
    with serve(served) as srv:
        list(train_loader(f"{srv.url}/s", loader_position(args), **args))
    assert skipped_shards() > before  # the wrong file was refused, not trained on


# ---------------------------------------------------------------------------------------------- partial evaluation
@pytest.fixture(scope="module")
def cut_set(sets, tmp_path_factory) -> Path:
    """A copy of the set (val: 4 + 2 samples) whose first val shard is cut in half."""
    root = tmp_path_factory.mktemp("cut")
    shutil.copytree(sets / "s", root / "s")
    shard = root / "s" / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return root / "s"


def test_a_partial_evaluation_names_the_shard_and_the_counts(sets, cut_set):
    from livt_ds.data.pipeline import eval_loader
    from livt_ds.data.transforms import eval_transform
    from livt_ds.evaluate import check_complete

    loader = eval_loader(cut_set, transform=eval_transform(16, (0.5,) * 3, (0.25,) * 3), batch_size=2, num_workers=1,
                         rank=0, world_size=1)
    scored = sum(len(labels) for _, labels in loader)
    found = check_complete(loader.dataset, scored, "val")
    assert 2 <= scored < 6  # the second shard whole, the first in part
    ((name, (got, want)),) = found["short_shards"].items()
    assert (name, want, found["expected"], found["scored"]) == ("val-000000.tar", 4, 6, scored) and got < 4
    assert f"val: scored {scored} of its 6 samples (val-000000.tar gave {got} of its 4 samples" in found["message"]
    whole = eval_loader(sets / "s", transform=eval_transform(16, (0.5,) * 3, (0.25,) * 3), batch_size=2,
                        num_workers=1, rank=0, world_size=1)
    assert check_complete(whole.dataset, sum(len(labels) for _, labels in whole), "val") is None


def test_livt_eval_of_a_partial_split_is_an_error(cut_set, tiny_export, tmp_path):
    from conftest import run_livt

    result = run_livt(["eval", "--config", "configs/tiny_bft.yaml", "--ds-config", "ds_configs/cpu_fp32.json",
                       "--output", str(tmp_path / "eval"), f"data.path={cut_set}", f"model.init={tiny_export}",
                       "model.img_size=16", "model.patch_size=8", "data.num_workers=1"], ranks=1, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "val-000000.tar gave" in result.stderr and "of its 4 samples" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "eval" / "metrics.json").exists()


def test_a_partial_evaluation_during_training_is_a_warning_recorded_in_the_metrics(cut_set, caplog):
    """The evaluation the trainer runs (evaluate.evaluate) on the same split: it goes on, warns, and records."""
    from livt_ds.config import load_recipe
    from livt_ds.data.remote import RemoteOptions
    from livt_ds.data.shards import load_meta
    from livt_ds.evaluate import evaluate
    from livt_ds.tasks import FinetuneTask

    recipe = load_recipe(REPO / "configs" / "tiny_bft.yaml", [f"data.path={cut_set}", "model.init=",
                                                              "model.img_size=16", "model.patch_size=8"])
    task = FinetuneTask(recipe, load_meta(cut_set))
    model = task.build_model().eval()
    with caplog.at_level("WARNING", logger="livt_ds.evaluate"):
        result = evaluate(task, model, model, recipe, RemoteOptions(), lambda x: x)
    metrics = result.metrics
    assert metrics["missing_samples"] == 6 - metrics["num_samples"] > 0 and "top1" in metrics
    assert list(metrics["incomplete"]["short_shards"]) == ["val-000000.tar"]
    assert "partial evaluation: val: scored" in caplog.text and "val-000000.tar gave" in caplog.text


# ---------------------------------------------------------------------------------------------- outage
def test_a_source_down_for_every_shard_is_an_outage_naming_the_url_not_a_damaged_set(sets):
    from datafixtures import loader_position

    from livt_ds.data.pipeline import train_loader
    from livt_ds.data.remote import RemoteOptions
    from livt_ds.data.transforms import pretrain_transform
    from livt_ds.errors import DataSourceOutage

    args = dict(transform=pretrain_transform(16, (0.5,) * 3, (0.25,) * 3), batch_size=4, num_workers=1, seed=0, epoch=0,
                rank=0, world_size=1, num_batches=3, shuffle_buffer=4,
                remote=RemoteOptions(retries=1, backoff_s=0.01))
    with serve(sets, down_after=0) as srv, pytest.raises(DataSourceOutage) as err:
        list(train_loader(f"{srv.url}/s", loader_position(args), **args))
    text = str(err.value)  # the worker's message, without the traceback the DataLoader wraps around it
    assert text.startswith("the data source is unavailable: reads of 3 shards in a row failed after their retries")
    assert f"{srv.url}/s/train-" in text and "503" in text and "gave up after 2 tries" in text
    assert "Traceback" not in text and "--verify" not in text


@pytest.mark.slow
def test_an_outage_saves_the_last_step_exits_4_and_resume_continues(toy_shards, tmp_path):
    """2 ranks over HTTP; the server goes down while the second epoch's loaders fill their shuffle buffers (after
    the first epoch's 3 steps); the run saves step 3 and stops. Resumed from a new server (another port: the same
    set) with more retries, it finishes."""
    from conftest import MGP_ARGS, read_jsonl, run_livt

    run = tmp_path / "run"
    common = [*MGP_ARGS, "--output", str(run), "train.epochs=2", "eval.every=0", "data.retry_backoff_s=0.01"]
    with serve(toy_shards.parent, down_after=250) as srv:
        first = run_livt(["pretrain", *common, f"data.path={srv.url}/{toy_shards.name}", "data.retries=0"],
                         check=False)
    assert first.returncode == 4, first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("livt pretrain: error:")]
    assert errors and f"{srv.url}/{toy_shards.name}/train-" in errors[0] and "HTTPError 503" in errors[0]
    assert "saved a checkpoint at step 3" in errors[0] and "--resume auto" in errors[0]
    assert "--verify" not in first.stderr and "Traceback" not in first.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert json.loads((run / "status.json").read_text())["phase"] == "stopped"
    with serve(toy_shards.parent) as srv:
        run_livt(["pretrain", *common, f"data.path={srv.url}/{toy_shards.name}", "data.retries=3"])
    history = read_jsonl(run / "history.jsonl")
    assert history[1]["reason"].startswith("error: DataSourceOutage") and history[1]["end_step"] == 3
    assert history[2]["start_step"] == 3 and history[3] == {**history[3], "end_step": 6, "reason": "finished"}
    assert set(history[2]["changes"]["operational"]) == {"data.path", "data.retries"}
