"""Launcher discovery: the variables of the deepspeed launcher / torchrun, SLURM (srun) and MPI (mpirun) become the
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* that torch.distributed reads; a plain process is a world of one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livt_ds.dist import cuda_device_index, expand_nodelist, launcher_settings, slurm_port


def no_port() -> int:
    raise AssertionError("a free port is only looked up for a plain process")


def test_torchrun_and_deepspeed_variables_are_kept():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29611",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "OMPI_COMM_WORLD_RANK": "3"}  # theirs win over the scheduler's
    assert launcher_settings(env, no_port) == ("deepspeed/torchrun", {
        "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29611"})
    assert launcher_settings({"RANK": "0", "WORLD_SIZE": "2"}, no_port)[1] == {
        "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_slurm_srun_variables():
    env = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3",
           "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_JOB_ID": "4242", "MASTER_PORT": "12345"}
    # the first node of the allocation, not the node srun was called from (often a login node)
    assert launcher_settings(env, no_port) == ("slurm", {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu-07", "MASTER_PORT": "12345"})
    # the step's nodes win over the job's; an explicit MASTER_ADDR wins over both
    assert launcher_settings({**env, "SLURM_STEP_NODELIST": "gpu-[09-10]"}, no_port)[1]["MASTER_ADDR"] == "gpu-09"
    name, values = launcher_settings({**env, "MASTER_ADDR": "node-a"}, no_port)
    assert name == "slurm" and values["MASTER_ADDR"] == "node-a"


def test_slurm_port_follows_the_job_id_unless_set():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu-[07-08]"}
    ports = {job: launcher_settings({**env, "SLURM_JOB_ID": job}, no_port)[1]["MASTER_PORT"]
             for job in ("4242", "4243", "987654")}
    assert ports == {"4242": "19242", "4243": "19243", "987654": "27654"}  # 15000 + id % 15000
    assert slurm_port("4242") == 19242
    # every task of a job derives the same port
    assert launcher_settings({**env, "SLURM_PROCID": "9", "SLURM_JOB_ID": "4242"}, no_port)[1]["MASTER_PORT"] == ports[
        "4242"]
    assert launcher_settings({**env, "SLURM_JOB_ID": "4242", "MASTER_PORT": "29400"}, no_port)[1]["MASTER_PORT"] == (
        "29400")


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("gpu-[07-08]", ["gpu-07", "gpu-08"]),
    ("gpu-07,gpu-09", ["gpu-07", "gpu-09"]),
    ("gpu-[07,09-10]", ["gpu-07", "gpu-09", "gpu-10"]),
    ("a100-n[0003-0004]", ["a100-n0003", "a100-n0004"]),
    ("node[9-11],login", ["node9", "node10", "node11", "login"]),
    ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
    ("solo", ["solo"]),
])
def test_slurm_nodelists_expand_in_order(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": nodelist}
    assert launcher_settings(env, no_port)[1]["MASTER_ADDR"] == hosts[0]


@pytest.mark.parametrize(("local_rank", "visible", "device"), [(3, 8, 3), (0, 8, 0), (3, 1, 0), (7, 1, 0), (1, 2, 1)])
def test_cuda_device_whether_a_task_sees_its_node_or_its_own_gpu(local_rank, visible, device):
    assert cuda_device_index(local_rank, visible) == device


def test_a_local_rank_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="local rank 5 has no GPU: this task sees 4 devices"):
        cuda_device_index(5, 4)
    # SLURM_PROCID alone (an sbatch shell, not srun) is not a SLURM launch
    assert launcher_settings({"SLURM_PROCID": "0"}, lambda: 4000)[0] == "single process"


@pytest.mark.parametrize(("env", "expected"), [
    ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, ("6", "8", "2")),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"}, ("3", "4", "1")),  # MPICH / Intel MPI
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, ("1", "2", "0")),
])
def test_mpi_variables(env, expected):
    name, values = launcher_settings({**env, "MASTER_ADDR": "head"}, no_port)
    assert name == "mpi"
    assert values == {"RANK": expected[0], "WORLD_SIZE": expected[1], "LOCAL_RANK": expected[2], "MASTER_ADDR": "head",
                      "MASTER_PORT": "29500"}


def test_plain_process_is_a_world_of_one_on_a_free_port():
    assert launcher_settings({}, lambda: 40123) == ("single process", {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "40123"})
    assert launcher_settings({"MASTER_PORT": "29999", "LOCAL_RANK": "4"}, no_port)[1] == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


def test_the_environment_is_not_touched():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    launcher_settings(env, no_port)
    assert env == {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}


def test_a_rank_imports_deepspeeds_muon_module_without_loading_inductor():
    """DeepSpeed's ZeRO optimizers import its Muon module even for AdamW; compiled at import, it would load Inductor
    into every rank's start-up. ``import_muon_uncompiled`` imports it with dynamo off, and restores the setting."""
    code = ("import os, sys\n"
            "from livt_ds.engine import import_muon_uncompiled\n"
            "import_muon_uncompiled()\n"
            "from deepspeed.runtime.zero.muon.original_muon import muon_update\n"
            "print('torch._inductor.compile_fx' in sys.modules, os.environ.get('TORCHDYNAMO_DISABLE'), "
            "muon_update.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "None", "deepspeed.runtime.zero.muon.original_muon"], out.stderr[-2000:]
