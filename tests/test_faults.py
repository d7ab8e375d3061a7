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

import torch

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
