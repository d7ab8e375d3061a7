"""Rank / world helpers and launcher discovery (deepspeed, torchrun, MPI, SLURM or one plain process)."""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

_CONTROL_GROUP: Any = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_settings(env: Mapping[str, str], free_port: Callable[[], int] = _free_port) -> tuple[str, dict[str, str]]:
    """Which launcher started this process, and the RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    values torch.distributed needs, from the launcher's variables in ``env`` (a pure function of ``env``).

    The deepspeed launcher and torchrun set them already. Under MPI (mpirun: Open MPI or PMI/MPICH) and SLURM
    (srun) their variables are translated; under SLURM the rendezvous is the first host of the step's (else the job's)
    node list, on a port derived from the job id. A plain process becomes a world of one on a free local port.
    Values already in ``env`` for LOCAL_RANK / MASTER_ADDR / MASTER_PORT are kept. Returns (name, variables).
    """
    out: dict[str, str] = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed/torchrun"
        out.update(RANK=env["RANK"], WORLD_SIZE=env["WORLD_SIZE"])
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        launcher = "mpi"
        out["RANK"] = env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", "0"))
        out["WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", "1"))
        local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", "0"))
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", local)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        out.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"])
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR") or (expand_nodelist(nodes)[0] if nodes else "127.0.0.1")
        if "SLURM_JOB_ID" in env:
            out["MASTER_PORT"] = env.get("MASTER_PORT", str(slurm_port(env["SLURM_JOB_ID"])))
    else:
        launcher = "single process"
        out.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        out["MASTER_PORT"] = env["MASTER_PORT"] if "MASTER_PORT" in env else str(free_port())
    out.setdefault("LOCAL_RANK", env.get("LOCAL_RANK", "0"))
    out.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    out.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return launcher, out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list in full, in order: ``gpu-[07,09-10],cpu1`` -> gpu-07, gpu-09, gpu-10, cpu1.

    Ranges keep their zero padding (``a100-n[0003-0004]``); several bracket groups in one name expand as a product.
    """
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", nodelist):
        variants = [""]
        for text, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            values = [text + value for value in _expand_ranges(group)] if group else [text]
            variants = [v + value for v in variants for value in values]
        hosts.extend(variants)
    return hosts


def _expand_ranges(group: str) -> list[str]:
    """``07,09-10`` -> 07, 09, 10 (the width of the first bound is kept)."""
    values: list[str] = []
    for part in group.split(","):
        first, _, last = part.partition("-")
        if not last:
            values.append(first)
            continue
        values.extend(str(n).zfill(len(first)) for n in range(int(first), int(last) + 1))
    return values


def slurm_port(job_id: str) -> int:
    """A port for the job's rendezvous derived from its id, so two jobs sharing a node do not collide: 15000-29999
    (under the Linux ephemeral range, which starts at 32768)."""
    return 15000 + int(re.sub(r"\D", "", job_id) or 0) % 15000


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device a rank drives: its local rank when the task sees every GPU of its node, device 0 when it sees
    only its own (``srun --gpus-per-task=1`` or a one-device CUDA_VISIBLE_DEVICES)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} has no GPU: this task sees {visible} devices "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one task per "
                       "GPU (srun --ntasks-per-node=GPUS) and let each see all of its node's GPUs or exactly one")


def discover_launcher_env() -> str:
    """Fill os.environ from :func:`launcher_settings` (whichever launcher started us); return its name."""
    launcher, values = launcher_settings(os.environ)
    os.environ.update(values)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: gloo, no CUDA ops
    return launcher


def init_distributed() -> str:
    """Start torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU) and a gloo group for control messages."""
    global _CONTROL_GROUP
    launcher = discover_launcher_env()
    if torch.cuda.is_available():
        device = cuda_device_index(int(os.environ["LOCAL_RANK"]), torch.cuda.device_count())
        os.environ["LOCAL_RANK"] = str(device)  # DeepSpeed and its process group take the device from LOCAL_RANK
        torch.cuda.set_device(device)
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
        _remove_shm_buffer_name()
        _use_current_collectives()
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return launcher


def shutdown() -> None:
    """Tear the process groups down before the interpreter exits (also after an error): left to the interpreter's
    exit, the gloo threads can be destroyed while a peer closes its sockets, and the process aborts ("terminate
    called without an active exception") instead of returning its exit code."""
    global _CONTROL_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def _remove_shm_buffer_name() -> None:
    """DeepSpeed's CPU all-reduce puts a ~69 MB buffer per rank in /dev/shm and never removes it, so every CPU run
    would leave its buffers behind (in memory) until a reboot. Once every rank has mapped its peers' buffers (done
    inside init_distributed; the barrier makes sure all ranks are past it) the names are no longer needed: the
    mappings live on until the processes exit, and nothing is left after them, even after a kill -9."""
    if torch.cuda.is_available() or not dist.is_initialized():
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


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


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a small CPU tensor (counts), dtype kept; returns a new CPU tensor."""
    values = values.detach().cpu().clone()
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(values, group=_CONTROL_GROUP)
    return values
