"""Scale-out: 8 ranks as 2 simulated nodes (two deepspeed launchers, --no_ssh, 4 ranks each, gloo) stop, then
resume on one node of 4 ranks through the universal checkpoint; nodes that do not share the output folder stop
together with one message instead of hanging; the per-rank file checks behind both."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, launcher_env, run_livt, train_losses

from livt_ds.checkpoint import ResumePlan, agree_on_resume, check_every_rank_saved, unreadable_on_this_rank
from livt_ds.errors import CheckpointError

MGP = ["--config", str(REPO / "configs" / "tiny_mgp.yaml"), "--ds-config", str(REPO / "ds_configs" / "cpu_fp32.json")]
# batch 16 with a micro-batch ceiling of 4: micro 2 on 8 ranks, micro 4 on 4 ranks (51 images: 3 steps per epoch);
# no DataLoader workers: 12 fewer processes on a 2-core machine
LAYOUT = ["train.batch_size=16", "train.micro_batch=4", "train.epochs=1", "eval.every=0", "data.num_workers=0"]


def launch_nodes(args: list[str], cwds: list[Path], ranks_per_node: int, tmp_path: Path,
                 timeout: int = 420) -> list[subprocess.CompletedProcess]:
    """One deepspeed launcher per simulated node (--no_ssh --node_rank i), all on this machine; a launch that
    outlives ``timeout`` (a hang) is killed and fails the test."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i} slots={ranks_per_node}\n" for i in range(len(cwds))))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                               "--num_nodes", str(len(cwds)), "--no_ssh", "--node_rank", str(i), "--master_addr",
                               "127.0.0.1", "--master_port", port, "--module", "livt_ds", *args],
                              cwd=cwd, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for i, cwd in enumerate(cwds)]
    results = []
    try:
        for proc in procs:
            out = proc.communicate(timeout=timeout)[0]
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the {len(cwds)}-node launch hung for {timeout} s")
    return results


def fp32_weights(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


@pytest.mark.slow
def test_two_nodes_of_4_stop_and_resume_on_one_node_of_4(toy_shards, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", *MGP, "--output", str(out), f"data.path={toy_shards}", *LAYOUT]
    nodes = launch_nodes([*args, "train.stop_after_steps=2"], [REPO, REPO], 4, tmp_path)
    log = nodes[0].stdout + nodes[1].stdout
    assert all(n.returncode == 0 for n in nodes), log[-6000:]
    assert "batch 16 = 2 x 1 x 8 ranks" in log  # the layout under the micro-batch ceiling of 4
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000002"
    assert len(list((ckpt / "step00000002").glob("*optim_states.pt"))) == 8
    # one node of 4 ranks: the universal checkpoint, at lr 0 to the end, so the weights must stay the saved ones
    resumed = run_livt([*args, "train.blr=0", "train.min_lr=0", "--allow-recipe-change"], ranks=4)
    text = resumed.stdout + resumed.stderr
    assert f"resumed from {ckpt / 'step00000002'} at step 2" in text, text[-4000:]
    assert "batch 16 = 4 x 1 x 4 ranks" in text
    assert (ckpt / "step00000002_universal").is_dir()
    assert sorted(train_losses(out)) == list(range(1, 4))
    assert (ckpt / "latest").read_text().strip() == "step00000003"
    assert len(list((ckpt / "step00000003").glob("*optim_states.pt"))) == 4
    saved, final = fp32_weights(ckpt, "step00000002"), fp32_weights(ckpt, "step00000003")
    assert saved.keys() == final.keys()
    for key in saved:
        assert torch.equal(saved[key], final[key]), key


@pytest.mark.slow
def test_nodes_that_do_not_share_the_output_folder_stop_together(toy_shards, tmp_path):
    """Each node launched from its own folder with a relative --output: every rank ends with one clear error."""
    cwds = [tmp_path / "node_a", tmp_path / "node_b"]
    for cwd in cwds:
        cwd.mkdir()
    args = ["pretrain", *MGP, "--output", "run", f"data.path={toy_shards}", *LAYOUT, "train.stop_after_steps=2"]
    nodes = launch_nodes(args, cwds, 2, tmp_path, timeout=300)
    log = nodes[0].stdout + nodes[1].stdout
    assert all(n.returncode != 0 for n in nodes), log[-6000:]
    host = os.uname().nodename
    assert f"2 rank(s) cannot read what rank 0 on {host} wrote in {cwds[0] / 'run'} at resume" in log, log[-6000:]
    assert f"rank 2 on {host} ({cwds[1] / 'run'})" in log, log[-6000:]
    assert "filesystem all nodes share" in log
    assert "Traceback" not in log
    assert not (cwds[0] / "run" / "checkpoints").exists() and not (cwds[1] / "run").exists()


# ------------------------------------------------------------------------------------------------ file checks
@pytest.fixture
def two_rank_checkpoint(pipeline_runs, tmp_path) -> Path:
    """A copy of the shared 2-rank MGP run's checkpoints."""
    shutil.copytree(pipeline_runs / "mgp" / "checkpoints", tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


@pytest.mark.slow
def test_each_rank_checks_the_files_the_plan_names_for_it(two_rank_checkpoint, tmp_path):
    ckpt = two_rank_checkpoint
    tag = (ckpt / "latest").read_text().strip()
    (tmp_path / ".all_ranks_see_this").write_text("token")
    same_world = ResumePlan(ckpt, tag, 2, 2)
    assert unreadable_on_this_rank(tmp_path, "token", same_world, 1) is None
    assert "another launch's token" in unreadable_on_this_rank(tmp_path, "other", same_world, 1)
    assert "written by rank 0, is not there" in unreadable_on_this_rank(tmp_path / "elsewhere", "token", None, 1)
    next((ckpt / tag).glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()
    assert unreadable_on_this_rank(tmp_path, "token", same_world, 0) is None
    assert "rank 1's ZeRO optimizer shard" in unreadable_on_this_rank(tmp_path, "token", same_world, 1)
    # another world size reads the universal folder (or the model states rank 0 converts from), not its shard
    assert unreadable_on_this_rank(tmp_path, "token", ResumePlan(ckpt, tag, 2, 3), 2) is None
    (ckpt / f"{tag}_universal").mkdir()
    assert "universal checkpoint" in unreadable_on_this_rank(tmp_path, "token", ResumePlan(ckpt, tag, 2, 3), 2)


@pytest.mark.slow
def test_a_save_that_misses_a_rank_is_refused(two_rank_checkpoint):
    tag_dir = two_rank_checkpoint / (two_rank_checkpoint / "latest").read_text().strip()
    check_every_rank_saved(tag_dir, 2)
    with pytest.raises(CheckpointError, match=r"sees no files of rank\(s\) 2.*filesystem all nodes share"):
        check_every_rank_saved(tag_dir, 3)
    next(tag_dir.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")).unlink()
    with pytest.raises(CheckpointError, match=r"1 rank\(s\) .* at the save of step\d+: rank 0 on .*: sees no files of "
                       r"rank\(s\) 0\."):
        check_every_rank_saved(tag_dir, 2)


def test_one_process_agrees_with_itself_and_leaves_no_mark(tmp_path):
    assert agree_on_resume(tmp_path / "run", "auto", 1) is None
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())
    with pytest.raises(CheckpointError, match="neither a run folder"):  # rank 0's error, raised on every rank
        agree_on_resume(tmp_path / "run", str(tmp_path / "nothing"), 1)
