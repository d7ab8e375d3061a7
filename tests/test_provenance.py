"""A run folder stays true to what was trained: recipe changes on resume, history.jsonl, one writer at a time."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, launcher_env, read_jsonl, run_livt, start_process

from livt_ds.config import load_recipe, recipe_to_dict
from livt_ds.errors import ConfigError, RunLockedError
from livt_ds.provenance import History, RunLock, check_resume_recipe, recipe_diff

BFT = ["finetune", "--config", "configs/tiny_bft.yaml", "--ds-config", "ds_configs/cpu_fp32.json"]


# ------------------------------------------------------------------------------------------- unit


def test_a_training_key_change_is_refused_naming_each_key_and_the_way_out():
    old = recipe_to_dict(load_recipe(REPO / "configs" / "tiny_bft.yaml"))
    new = recipe_to_dict(load_recipe(REPO / "configs" / "tiny_bft.yaml",
                                     ["loss.name=ce", "train.epochs=3", "eval.every=2"]))
    with pytest.raises(ConfigError) as err:
        check_resume_recipe(old, new, allow=False, checkpoint="runs/x/checkpoints/step00000006", output="runs/x")
    text = str(err.value)
    assert "loss.name: 'bal_bce' -> 'ce'" in text and "train.epochs: 2 -> 3" in text
    assert "eval.every" not in text  # bookkeeping is not listed as a problem
    assert "--allow-recipe-change" in text and "another --output" in text
    diff = check_resume_recipe(old, new, allow=True, checkpoint="c", output="o")
    assert diff == {"eval.every": [1, 2], "loss.name": ["bal_bce", "ce"], "train.epochs": [2, 3]}


def test_bookkeeping_changes_pass_without_the_flag():
    old = recipe_to_dict(load_recipe(REPO / "configs" / "tiny_bft.yaml"))
    new = recipe_to_dict(load_recipe(REPO / "configs" / "tiny_bft.yaml", [
        "eval.every=5", "eval.batch_size=4", "log.every_steps=7", "log.progress=false", "checkpoint.keep_last=9",
        "checkpoint.every_steps=3", "train.stop_after_steps=4"]))
    diff = check_resume_recipe(old, new, allow=False, checkpoint="c", output="o")
    assert set(diff) == {"eval.every", "eval.batch_size", "log.every_steps", "log.progress", "checkpoint.keep_last",
                         "checkpoint.every_steps", "train.stop_after_steps"}
    assert recipe_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == {"a.c": [None, 2]}


def test_run_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        holder = json.loads((tmp_path / "run.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    assert not (tmp_path / "run.lock").exists()
    RunLock(tmp_path).acquire().release()  # free again


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "x"}))
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs procfs")
def test_a_lock_held_by_a_zombie_is_taken_over(tmp_path):
    """A rank killed with its parent stays a zombie until something reaps it (never, under a container's first
    process that does not reap orphans): it holds nothing, its lock must not block the resume."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # it has exited; not reaped: a zombie now
        (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": child.pid,
                                                       "started": "x"}))
        lock = RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()  # ours now, not the zombie's
        lock.release()
        assert not (tmp_path / "run.lock").exists()
    finally:
        child.wait()


def test_a_lock_of_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-b", "pid": 1, "started": "x", "command": ["p"]}))
    with pytest.raises(RunLockedError, match="pid 1 on node-b"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / "run.lock", (old, old))
    lock = RunLock(tmp_path, stale_after_s=60).acquire()
    lock.release()


def test_the_heartbeat_refreshes_the_lock(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        old = time.time() - 1000
        os.utime(tmp_path / "run.lock", (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / "run.lock").stat().st_mtime < 10
    finally:
        lock.release()


def test_release_leaves_a_lock_it_does_not_own(tmp_path):
    lock = RunLock(tmp_path).acquire()
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-b", "pid": 7}))
    lock.release()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == 7


def test_history_segments_carry_the_recipe_and_its_diff(tmp_path):
    history = History(tmp_path)
    a = recipe_to_dict(load_recipe(None, ["train.epochs=1"]))
    b = recipe_to_dict(load_recipe(None, ["train.epochs=2"]))
    kwargs = {"stage": "finetune", "world_size": 2, "hosts": ["h"], "resumed_from": None, "schedule": {}}
    assert history.start(recipe=a, start_step=0, diff=None, **kwargs) == 0
    history.end(0, end_step=3, reason="finished")
    assert history.start(recipe=b, start_step=3, diff=None, **kwargs) == 1
    records = history.records()
    assert [r["event"] for r in records] == ["start", "end", "start"]
    assert records[2]["recipe_diff"] == {"train.epochs": [1, 2]} and records[2]["recipe"] == b
    assert records[0]["versions"]["torch"] and records[0]["recipe_sha256"] != records[2]["recipe_sha256"]
    assert history.last_recipe() == b


# ------------------------------------------------------------------------------------------- end to end



@pytest.fixture(scope="module")
def finished_bft(toy_shards, tmp_path_factory) -> Path:
    """A finished 1-epoch (3-step) Bal-BCE BFT run from scratch, 2 CPU ranks."""
    run = tmp_path_factory.mktemp("prov") / "bft"
    run_livt([*BFT, "--output", str(run), f"data.path={toy_shards}", "model.init=", "train.epochs=1",
              "augment.mixup=0", "augment.cutmix=0", "eval.every=1"])
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.mark.slow
@pytest.mark.xdist_group("finished_bft")
def test_resume_with_another_loss_stops_before_anything_is_written(finished_bft, toy_shards, tmp_path):
    run = _copy(finished_bft, tmp_path)
    before = (run / "config.yaml").read_bytes(), (run / "history.jsonl").read_text()
    result = run_livt([*BFT, "--output", str(run), f"data.path={toy_shards}", "model.init=", "train.epochs=2",
                       "augment.mixup=0", "augment.cutmix=0", "loss.name=ce"], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "loss.name: 'bal_bce' -> 'ce'" in result.stderr and "train.epochs: 1 -> 2" in result.stderr
    assert "--allow-recipe-change" in result.stderr
    assert ((run / "config.yaml").read_bytes(), (run / "history.jsonl").read_text()) == before
    assert not (run / "run.lock").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("finished_bft")
def test_bookkeeping_change_and_an_allowed_epoch_extension_are_recorded(finished_bft, toy_shards, tmp_path):
    run = _copy(finished_bft, tmp_path)
    common = [*BFT, "--output", str(run), f"data.path={toy_shards}", "model.init=", "augment.mixup=0",
              "augment.cutmix=0"]
    run_livt([*common, "train.epochs=1", "eval.every=2"])  # benign: accepted (nothing left to train)
    # more epochs, and 2 loader workers: a stream other than the checkpoint's, which the resume must say
    resumed = run_livt([*common, "train.epochs=2", "eval.every=2", "data.num_workers=2", "--allow-recipe-change"])
    console = resumed.stdout + resumed.stderr
    history = read_jsonl(run / "history.jsonl")
    assert [(r["event"], r["segment"]) for r in history] == [("start", 0), ("end", 0), ("start", 1), ("end", 1),
                                                            ("start", 2), ("end", 2)]
    assert history[0]["start_step"] == 0 and history[1] == {**history[1], "end_step": 3, "reason": "finished"}
    assert history[2]["recipe_diff"] == {"eval.every": [1, 2]} and history[2]["start_step"] == 3
    assert history[3]["end_step"] == 3
    assert history[4]["recipe_diff"] == {"train.epochs": [1, 2], "data.num_workers": [0, 2]}
    assert history[4]["schedule"]["change"]["total_steps"] == [3, 6]
    assert "the data stream differs from the checkpoint's" in console and "'workers': [0, 2]" in console
    assert history[5] == {**history[5], "end_step": 6, "reason": "finished"}
    assert history[4]["world_size"] == 2 and history[4]["hosts"] == [socket.gethostname()]
    assert "--allow-recipe-change" in history[4]["command"]
    assert history[0]["recipe"]["train"]["epochs"] == 1  # the earlier segment's recipe stays readable
    assert "epochs: 2" in (run / "config.yaml").read_text()
    # the lr of the new segment is the schedule planned for 6 steps (warm-up 3 steps, then cosine to min_lr)
    base, min_lr = 1e-3 * 16 / 256, 1e-6
    expected = {s: min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - 1 - 3) / 3)) for s in (4, 5, 6)}
    logged = {r["step"]: r["lr"] for r in read_jsonl(run / "metrics.jsonl") if "lr" in r and r["step"] > 3}
    assert logged == pytest.approx(expected, rel=1e-9)
    # the lr before and after the change, recorded for the first step of the new segment: the 3-step plan had
    # reached the end of its warm-up (base lr); the 6-step plan gives the lr logged at step 4
    assert history[4]["schedule"]["change"]["lr_at_resume"] == pytest.approx([base, expected[4]], rel=1e-9)
    assert f"lr at step 3 {base:.3g} -> {expected[4]:.3g}" in console


@pytest.mark.slow
def test_a_second_launch_is_refused_and_a_killed_runs_lock_does_not_block_resume(toy_shards, tmp_path):
    run = tmp_path / "live"
    args = [*BFT, "--output", str(run), f"data.path={toy_shards}", "model.init=", "train.epochs=400",
            "augment.mixup=0", "augment.cutmix=0", "checkpoint.every_steps=1", "eval.every=0"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "livt_ds", *args]
    live = start_process(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "latest").is_file():
            assert live.poll() is None and time.time() < deadline, "the first run did not reach a checkpoint"
            time.sleep(0.5)
        holder = json.loads((run / "run.lock").read_text())
        second = run_livt(args, ranks=0, check=False)  # one process is enough to be refused
        assert second.returncode == 2
        assert f"is in use by another run (pid {holder['pid']} on {holder['host']}" in second.stderr
    finally:
        os.killpg(live.pid, signal.SIGKILL)  # no chance to release the lock or save
        live.wait(timeout=60)
    assert (run / "run.lock").is_file()
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    run_livt([*args, f"train.stop_after_steps={step + 1}"])
    history = read_jsonl(run / "history.jsonl")
    assert [r["event"] for r in history] == ["start", "start", "end"]  # the killed segment has no end record
    assert history[1]["start_step"] == step and history[2] == {**history[2], "end_step": step + 1,
                                                                "reason": "stop_after_steps"}
    assert not (run / "run.lock").exists()


@pytest.mark.slow
def test_exports_and_evaluations_name_the_weights_they_came_from(pipeline_runs):
    from livt_ds.checkpoint import saved_recipe
    from livt_ds.provenance import recipe_digest
    from livt_ds.weights import weights_provenance

    bft = pipeline_runs / "bft"
    tag = (bft / "checkpoints" / "latest").read_text().strip()
    trained_with = saved_recipe(bft / "checkpoints" / tag)
    expected = {"run": str(bft.resolve()), "checkpoint_tag": tag, "recipe_sha256": recipe_digest(trained_with)}
    assert trained_with["loss"]["name"] == "bal_bce"
    assert json.loads((bft / "export" / "config.json").read_text())["livt"]["provenance"] == expected
    assert weights_provenance(bft) == {**expected, "weights": str(bft.resolve())}  # through its export
    ckpts = bft / "checkpoints"
    assert weights_provenance(ckpts) == {**expected, "weights": str(ckpts.resolve())}  # straight from the checkpoint


@pytest.mark.slow
@pytest.mark.xdist_group("finished_bft")
def test_resume_from_a_copy_of_the_set_behind_a_url_with_more_retries_is_recorded(finished_bft, toy_shards,
                                                                                   tmp_path):
    from httpserver import serve

    run = _copy(finished_bft, tmp_path)
    with serve(toy_shards.parent) as srv:
        run_livt([*BFT, "--output", str(run), f"data.path={srv.url}/{toy_shards.name}/", "model.init=",
                  "train.epochs=1", "augment.mixup=0", "augment.cutmix=0", "data.retries=9", "data.num_workers=1"])
    start = [r for r in read_jsonl(run / "history.jsonl") if r["event"] == "start"][-1]
    assert start["changes"] == {"training": {}, "operational": {
        "data.path": [str(toy_shards), f"{srv.url}/{toy_shards.name}/"], "data.retries": [5, 9],
        "data.num_workers": [0, 1]}}
    assert start["data_sha256"] == read_jsonl(run / "history.jsonl")[0]["data_sha256"] is not None
