"""Shared fixtures and launch helpers for the suite. Reuse them rather than training new runs.

Data and runs, each built once per test session (under ``pytest -n 3`` once for all workers, see ``shared_folder``):
- ``toy_shards``: 51 long-tailed training images (24/14/8/5 over 4 classes) in 4 shards, 20 balanced val images.
- ``pipeline_runs``: ``mgp`` (tiny MGP, ZeRO-2 fp32, 2 epochs = 6 steps, evaluated each epoch) -> ``bft`` (tiny BFT
  from it, no mixup/cutmix) -> both exported; 2 CPU ranks under the deepspeed launcher. The launches' stdout/stderr
  are kept as ``<run>.stdout`` / ``<run>.stderr`` beside the run folders. Treat the folders as read-only: copy
  what a test changes.

Processes: every launch runs in a process group of its own and is killed, with every process it started, when it
outlives its timeout or the test (``run_livt``, ``run_process``, ``start_process``). Before the kill each Python
process of it is sent SIGABRT, so that faulthandler (PYTHONFAULTHANDLER=1) prints where it was stuck into the
captured output. Launches on CPU are forked from a process that has imported the package: each pytest process's fork
server (``fork_launch``; tests/fork_ranks.py).
The suite runs with ``-n 3 --dist loadgroup`` (``make test``); tests marked ``xdist_group(name)`` run on one worker,
one after another: ``serial`` for the timing-sensitive ones (SIGTERM, chaos).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN_COUNTS = (24, 14, 8, 5)  # a long tail over 4 classes: 51 training images
VAL_PER_CLASS = 5
# One launch's limit; a whole test, its fixtures included, has 300 s (pyproject's `timeout`). On a machine much slower
# than 2 free cores raise both: LIVT_LAUNCH_TIMEOUT_S=900 pytest --timeout 1800 ...
LAUNCH_TIMEOUT_S = float(os.environ.get("LIVT_LAUNCH_TIMEOUT_S", "240"))

# Each pytest worker computes in-process on one thread: the workers share the 2 cores with each other and with the
# launches' ranks, and OpenMP threads of several processes on the same cores spin against each other (an in-process
# evaluation took 10x its time beside a launch). Set before torch is first imported, here or by a test module.
os.environ["OMP_NUM_THREADS"] = "1"

# DeepSpeed's JIT ops (shm comm, CPU Adam): `make venv` builds them into .venv/torch_extensions; use that copy
# when pytest is run by hand too, instead of building another one in ~/.cache.
if (Path(sys.prefix) / "torch_extensions").is_dir():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--dist loadgroup`` sends the tests of one ``xdist_group`` to one worker by reading "@group" at the end of
    their node ids. pytest-xdist 3.8 appends it through ``item._nodeid``, which pytest 9 no longer reads (node ids
    come from ``item._id``): append it here too, in the workers, or every group would be split."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = type(item._id).parse(f"{item.nodeid}@{'_'.join(names)}")


def _image(rng: np.random.Generator, label: int, size: int = 20) -> bytes:
    """A class-dependent colour + stripe pattern with noise, so the classes are learnable but not trivial."""
    base = np.zeros((size, size, 3), np.float32)
    base[..., label % 3] = 0.7
    stripes = (np.arange(size)[:, None] // (2 + label) % 2).astype(np.float32)
    base += 0.3 * stripes[..., None]
    base += rng.normal(0, 0.15, base.shape)
    buf = io.BytesIO()
    Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_image_folder(root: Path, train_counts=TRAIN_COUNTS, val_per_class=VAL_PER_CLASS, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, counts in (("train", train_counts), ("val", [val_per_class] * len(train_counts))):
        for label, count in enumerate(counts):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"img{i:03d}.png").write_bytes(_image(rng, label))
    return root


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``name``'s folder, filled by ``build(folder)`` once per test session: under pytest-xdist the first worker
    that asks builds it while the others wait on a file lock, then all read the same files. A build that failed
    (no ``.done`` marker) is redone by the next asker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".done").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> Path:
    """shards/toy-like set: 51 long-tailed training images in 4 shards, 20 balanced val images in 2 shards."""
    from livt_ds.data.make_shards import main as make_shards

    def build(root: Path) -> None:
        make_image_folder(root / "raw")
        code = make_shards(["--source", "imagefolder", "--input", str(root / "raw"), "--output",
                            str(root / "shards"), "--shard-size", "14", "--workers", "1"])
        assert code == 0

    out = shared_folder(tmp_path_factory, "toy", build) / "shards"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["class_counts"] == list(TRAIN_COUNTS)
    return out


# CI runs the launches on CPU ranks (gloo). scripts/gpu_check.sh runs tests/test_bf16_configs.py with
# LIVT_TEST_DEVICE=cuda: the same launches on CUDA ranks (nccl), as many as there are GPUs, 2 at most.
TEST_DEVICE = os.environ.get("LIVT_TEST_DEVICE", "cpu")


def launch_ranks(wanted: int = 2) -> int:
    """How many ranks a launch test gets: ``wanted`` CPU processes, or on CUDA at most one per GPU."""
    if TEST_DEVICE == "cpu":
        return wanted
    import torch

    return min(wanted, torch.cuda.device_count())


# Set in this process by the tests that build an engine in-process (its process group keeps MASTER_PORT bound):
# a launch must not inherit them, or its rendezvous collides with ours.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    if TEST_DEVICE == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.pop("DS_ACCELERATOR", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a SIGABRT (sent before a hung launch is killed) prints every thread's stack
    for name in (*RENDEZVOUS_VARS, "PYTEST_XDIST_WORKER"):
        env.pop(name, None)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ processes
_LIVE: set[subprocess.Popen] = set()  # started by start_process and not yet waited for
# A process group of its own, in the session of pytest (the fork server's launches join their client's group).
NEW_PROCESS_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def live_processes() -> dict[int, tuple[int, int]]:
    """Every live process (zombies left out: they hold nothing any more): pid -> (parent pid, process group)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = (Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                table[int(entry)] = int(fields[1]), int(fields[2])
    return table


def group_members(pgid: int) -> dict[int, int]:
    """The live processes of group ``pgid``, with their parents."""
    return {pid: parent for pid, (parent, group) in live_processes().items() if group == pgid}


def process_tree(pid: int) -> list[int]:
    """``pid``, every live descendant (torchrun puts each rank in a session of its own: a group kill alone would miss
    them) and every process of its group (the fork server's launches join their client's group)."""
    processes = live_processes()
    children: dict[int, list[int]] = {pid: [member for member, (_, group) in processes.items() if group == pid]}
    for child, (parent, _) in processes.items():
        children.setdefault(parent, []).append(child)
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in tree:
            tree.add(current)
            todo.extend(children.get(current, []))
    return sorted(tree)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to ``proc``'s whole process group, as a crashing node or the OOM killer would; return once every
    process of it is gone (never hangs)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    _LIVE.discard(proc)
    deadline = time.monotonic() + 60
    while survivors := group_members(proc.pid):
        assert time.monotonic() < deadline, f"processes of group {proc.pid} survived SIGKILL: {survivors}"
        time.sleep(0.05)


def kill_tree(proc: subprocess.Popen, dump_stacks: bool = True) -> None:
    """End ``proc`` and everything it started: SIGABRT first (each Python process prints its stacks through
    faulthandler), then SIGKILL to its process group and every descendant; reaps ``proc``."""
    if proc.poll() is None:
        pids = process_tree(proc.pid)
        if dump_stacks:
            for pid in pids:
                _signal(pid, signal.SIGABRT)
            time.sleep(2)
            pids = sorted(set(pids) | set(process_tree(proc.pid)))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            _signal(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    _LIVE.discard(proc)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_process(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a process group of its own (the launcher, its ranks and their loader workers), killed
    with all it started at the end of the test if it is still running then."""
    proc = subprocess.Popen(cmd, **NEW_PROCESS_GROUP, **kwargs)
    _LIVE.add(proc)
    return proc


def finish_process(proc: subprocess.Popen, timeout: float, input: str | None = None) -> tuple[str, str]:
    """``proc.communicate`` that never hangs: past ``timeout`` (or when the test is interrupted, e.g. by its own
    timeout) the stacks of every process are dumped, the tree is killed and the output so far is printed."""
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException as exc:
        kill_tree(proc)
        out, err = proc.communicate()
        shown = f"{' '.join(map(str, proc.args))}\n{(out or '')[-4000:]}\n{(err or '')[-12000:]}"
        print(f"killed (stacks above the kill, if any): {shown}", file=sys.stderr)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise AssertionError(f"did not end within {timeout} s, killed: {shown}") from None
        raise
    _LIVE.discard(proc)
    return out, err


def run_process(cmd: list[str], *, timeout: float = LAUNCH_TIMEOUT_S, input: str | None = None,
                **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` through ``start_process`` / ``finish_process``."""
    proc = start_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.PIPE if input is not None else None, **kwargs)
    out, err = finish_process(proc, timeout, input)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """Whatever a test started and left running is killed (with its stacks dumped) when the test ends."""
    yield
    for proc in list(_LIVE):
        kill_tree(proc, dump_stacks=proc.poll() is None)


# The fork servers of this pytest process (tests/fork_ranks.py --serve), one per environment its launches have had;
# LIVT_FORK_SERVER=0 turns them off (each launch then imports the package itself, as `python tests/fork_ranks.py`).
USE_FORK_SERVER = TEST_DEVICE == "cpu" and os.environ.get("LIVT_FORK_SERVER", "1") != "0"
KEPT_FORK_SERVERS = 2  # tests that import the package in-process change os.environ once or twice, then it holds
_FORK_SERVERS: dict[str, tuple[str, subprocess.Popen]] = {}  # environment -> (socket path, process), oldest first


def fork_server() -> tuple[str, subprocess.Popen]:
    """The socket path and process of the fork server for the launches' environment now (``launcher_env``), started
    at its first launch: it imports the package once and forks every later launch from that copy. The socket is
    bound here and handed over, so a launch can connect (and wait) before the server has finished importing."""
    import socket
    import tempfile

    from fork_ranks import LAUNCH_VARIABLES

    env = launcher_env()
    key = json.dumps(sorted((name, value) for name, value in env.items() if name not in LAUNCH_VARIABLES))
    if key in _FORK_SERVERS and _FORK_SERVERS[key][1].poll() is None:
        return _FORK_SERVERS[key]
    path = os.path.join(tempfile.mkdtemp(prefix="livt-fork-"), "socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(16)
        process = subprocess.Popen([sys.executable, str(REPO / "tests" / "fork_ranks.py"), "--serve",
                                    str(listener.fileno())], pass_fds=[listener.fileno()], env=env,
                                   stdin=subprocess.DEVNULL, **NEW_PROCESS_GROUP)
    _FORK_SERVERS.pop(key, None)
    _FORK_SERVERS[key] = path, process
    while len(_FORK_SERVERS) > KEPT_FORK_SERVERS:
        _stop_fork_server(*_FORK_SERVERS.pop(next(iter(_FORK_SERVERS))))
    return path, process


def _stop_fork_server(path: str, process: subprocess.Popen) -> None:
    """Its launches live on: each is in its own client's process group."""
    process.kill()
    process.wait()
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _stop_the_fork_servers():
    yield
    while _FORK_SERVERS:
        _stop_fork_server(*_FORK_SERVERS.popitem()[1])


def fork_launch(ranks: int) -> list[str]:
    """The command that runs `livt ARGS` (appended) on ``ranks`` forked CPU ranks, 0 for one plain process: through
    the fork server, or ``python tests/fork_ranks.py`` (which imports the package itself)."""
    if USE_FORK_SERVER:
        return [sys.executable, str(REPO / "tests" / "fork_client.py"), fork_server()[0], str(ranks)]
    return [sys.executable, str(REPO / "tests" / "fork_ranks.py"), str(ranks)]


def launch_command(ranks: int, launcher: str = "fork") -> list[str]:
    """The command line that starts ``ranks`` ranks of `livt` (its arguments follow), each with the variables
    torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
    - ``fork``: the suite's cheap default. On CPU the ranks are forked from a process that has imported the package
      (``fork_launch``: a fourth of the CPU of a 2-rank launch); on CUDA they are ``python -m livt_ds`` processes
      started from ``sh``. The exit code is the first failing rank's.
    - ``deepspeed``: the launcher users run (runner + launch, each importing deepspeed), which the shared pipeline
      runs, the SIGTERM and multi-node tests use."""
    n, port = launch_ranks(ranks), str(free_port())
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", port,
                "--module", "livt_ds"]
    variables = f"WORLD_SIZE={n} LOCAL_WORLD_SIZE={n} MASTER_ADDR=127.0.0.1 MASTER_PORT={port}"
    if TEST_DEVICE == "cpu":
        return ["sh", "-c", f'export {variables}; exec {shlex.join(fork_launch(n))} "$@"', "livt-ranks"]
    python = shlex.quote(sys.executable)
    script = (f"export {variables}; pids=; "
              f"for r in $(seq 0 {n - 1}); do RANK=$r LOCAL_RANK=$r {python} -m livt_ds \"$@\" & pids=\"$pids $!\"; "
              "done; rc=0; for p in $pids; do wait $p; s=$?; [ $rc -ne 0 ] || rc=$s; done; exit $rc")
    return ["sh", "-c", script, "livt-ranks"]


def run_livt(args: list[str], *, ranks: int = 2, cwd: Path | None = None, check: bool = True,
             timeout: float = LAUNCH_TIMEOUT_S, launcher: str | None = None) -> subprocess.CompletedProcess:
    """Run `livt ARGS` with ``ranks`` CPU processes under ``launcher`` (ranks == 0: one process without a launcher's
    variables): by default the ``fork`` launch, or the deepspeed launcher for a test that reads the exit code
    (``check=False``): the one users run, which passes a rank's exit code on."""
    launcher = launcher or ("fork" if check else "deepspeed")
    if ranks:
        cmd = [*launch_command(ranks, launcher), *args]
    else:
        plain = fork_launch(0) if TEST_DEVICE == "cpu" else [sys.executable, "-m", "livt_ds"]
        cmd = [*plain, *args]
    result = run_process(cmd, cwd=cwd or REPO, env=launcher_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


MGP_ARGS = ["--config", "configs/tiny_mgp.yaml", "--ds-config", "ds_configs/cpu_fp32.json"]
BFT_ARGS = ["--config", "configs/tiny_bft.yaml", "--ds-config", "ds_configs/cpu_fp32.json"]


def _keep_output(result: subprocess.CompletedProcess, stem: Path) -> None:
    stem.with_suffix(".stdout").write_text(result.stdout)
    stem.with_suffix(".stderr").write_text(result.stderr)


@pytest.fixture(scope="session")
def pipeline_runs(toy_shards, tmp_path_factory) -> Path:
    """MGP -> BFT (from the MGP run) -> export, under the deepspeed launcher with 2 CPU ranks, trained once per
    session; ``mgp`` is also the uninterrupted ZeRO-2 MGP run the resume and HTTP tests compare with."""
    def build(out: Path) -> None:
        data = f"data.path={toy_shards}"
        _keep_output(run_livt(["pretrain", *MGP_ARGS, "--output", str(out / "mgp"), data, "train.epochs=2"],
                              launcher="deepspeed"), out / "mgp")
        _keep_output(run_livt(["finetune", *BFT_ARGS, "--output", str(out / "bft"), data, f"model.init={out / 'mgp'}",
                               "train.epochs=2", "augment.mixup=0", "augment.cutmix=0"], launcher="deepspeed"),
                     out / "bft")
        from livt_ds.weights import export

        export(out / "bft")  # what `livt export RUN` runs, without another interpreter start-up
        export(out / "mgp")

    return shared_folder(tmp_path_factory, "pipeline", build)
