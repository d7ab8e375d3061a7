"""Launcher discovery: the variables of the deepspeed launcher / torchrun, SLURM (srun) and MPI (mpirun) become the
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* that torch.distributed reads; a plain process is a world of one."""

from __future__ import annotations

import pytest

from livt_ds.dist import launcher_settings


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
           "MASTER_PORT": "12345"}
    assert launcher_settings(env, no_port) == ("slurm", {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "12345"})
    # an explicit MASTER_ADDR (e.g. the first host of the allocation) wins over the launch node
    name, values = launcher_settings({**env, "MASTER_ADDR": "node-a"}, no_port)
    assert name == "slurm" and values["MASTER_ADDR"] == "node-a"
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
