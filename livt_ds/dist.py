"""Rank / world helpers and launcher discovery (deepspeed, torchrun, MPI, SLURM or one plain process)."""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

_CONTROL_GROUP: Any = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def discover_launcher_env() -> str:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from whichever launcher started us; return its name.

    The deepspeed launcher and torchrun set them already. Under MPI (mpirun) and SLURM (srun) we translate
    their variables. A plain process becomes a world of one on a free local port.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed/torchrun"
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        launcher = "mpi"
        env["RANK"] = env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", "0"))
        env["WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", "1"))
        env.setdefault("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", "0")))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    else:
        launcher = "single process"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: gloo, no CUDA ops
    return launcher


def init_distributed() -> str:
    """Start torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU) and a gloo group for control messages."""
    global _CONTROL_GROUP
    launcher = discover_launcher_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif "OMP_NUM_THREADS" not in os.environ:  # CPU ranks on one host: share the cores instead of oversubscribing
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    if not dist.is_initialized():
        if not torch.cuda.is_available():  # torch warns on import of its extension builder when nvcc is on PATH
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        quiet = int(os.environ.get("RANK", "0")) != 0  # DeepSpeed prints its CPU comm op build line on every rank
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            import deepspeed

            deepspeed.init_distributed(timeout=datetime.timedelta(minutes=30))
        _use_current_collectives()
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return launcher


def _use_current_collectives() -> None:
    """Point DeepSpeed's comm backend at ``all_gather_single`` / ``reduce_scatter_single`` where torch has them.

    DeepSpeed 0.19.8 calls ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (ZeRO-2 parameter all-gather),
    which newer torch deprecates with a FutureWarning on every rank, naming these replacements: same arguments
    (output, input, op, group, async_op), same result.
    """
    from deepspeed import comm

    backend = comm.comm.cdb
    pairs = (("all_gather_function", "all_gather_single"), ("reduce_scatter_function", "reduce_scatter_single"))
    for attr, name in pairs:
        current = getattr(dist, name, None)
        if backend is not None and current is not None and getattr(backend, attr, None) is not None:
            setattr(backend, attr, current)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_CONTROL_GROUP)


def any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank; a CPU (gloo) collective, so it never syncs the GPU stream."""
    if not dist.is_initialized() or world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(value.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL_GROUP)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank (small objects only: RNG states, counters)."""
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_CONTROL_GROUP)
    return out


def gather_tensors(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a [n_r, ...] CPU tensor from every rank (n_r may differ by rank), in rank order."""
    parts = gather_objects(tensor.cpu())
    return torch.cat(parts, dim=0)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small tensor (logged values); returns a CPU tensor."""
    values = values.detach().float().cpu()
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(values, group=_CONTROL_GROUP)
        values /= world_size()
    return values
