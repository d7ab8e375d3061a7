"""The suite's fork server (tests/fork_ranks.py --serve), which forks the CPU launches from its imported copy of the
package: a launch it forks belongs to the process group the test started, so the group kill every test relies on
(timeouts, chaos) ends its ranks too; a launch whose environment differs from the server's is run on its own."""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import (
    MGP_ARGS,
    REPO,
    USE_FORK_SERVER,
    fork_server,
    group_members,
    kill_group,
    launch_command,
    launcher_env,
    start_process,
    train_losses,
)

pytestmark = pytest.mark.skipif(not USE_FORK_SERVER, reason="no fork server (LIVT_FORK_SERVER=0, or CUDA)")


@pytest.mark.slow
@pytest.mark.parametrize("environment", ["the server's", "another"])
def test_a_launch_is_in_the_tests_process_group_and_ends_with_it(environment, toy_shards, tmp_path):
    out = tmp_path / "run"
    env = launcher_env()
    if environment == "another":
        env["LIVT_TEST_OTHER_ENVIRONMENT"] = "1"
    cmd = [*launch_command(1), "pretrain", *MGP_ARGS, "--output", str(out), f"data.path={toy_shards}",
           "train.epochs=200", "eval.every=0"]
    proc = start_process(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not ((out / "metrics.jsonl").is_file() and train_losses(out)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)

    members = group_members(proc.pid)
    server = fork_server()[1].pid
    if environment == "another":  # the client became the launch: the rank is its child, nothing is the server's
        assert server not in members.values() and proc.pid in members.values(), members
    else:  # the client, the launch process the server forked, and the rank forked from it
        launch = next(pid for pid, parent in members.items() if parent == server)
        assert launch in members.values() and proc.pid not in members.values(), members

    kill_group(proc)  # and nothing of the launch survives it
