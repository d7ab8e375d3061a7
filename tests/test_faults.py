"""Faults say what they are: one-line errors, atomic lock takeover, files with the user's umask, partial
evaluations, shard digests checked by the cache, predict on URLs and on nothing, a remote outage."""

from __future__ import annotations

import json
import multiprocessing
import os
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

from livt_ds.provenance import RunLock, RunLockedError


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
def tiny_export(tmp_path_factory) -> Path:
    """An export of an (untrained) tiny classifier of 16-px images: what predict needs, without a training run."""
    from livt_ds.config import load_recipe
    from livt_ds.hub import build_timm_model, hub_config, write_export

    recipe = load_recipe(REPO / "configs" / "tiny_bft.yaml", ["model.img_size=16", "model.patch_size=8"])
    config = hub_config(recipe, "finetune", ["a", "b", "c", "d"], [6, 3, 2, 1], [0.5] * 3, [0.25] * 3)
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
