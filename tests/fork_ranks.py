"""The suite's cheap launch: ``python tests/fork_ranks.py N ARGS...`` runs `livt ARGS` on N CPU ranks, as N
processes forked from this one after it has imported the package (torch, torchvision, timm, DeepSpeed: about 4 CPU
seconds that each rank of ``python -m livt_ds`` pays again). Each rank gets the variables torchrun would set (RANK,
LOCAL_RANK; WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the caller), runs
``livt_ds.cli.main(ARGS)`` and exits as the interpreter would: atexit handlers run, streams flushed, an uncaught
exception printed with exit code 1. The ranks stay in this process's group (one kill ends the launch); the exit
code is the first failing rank's, 128 + N for a rank killed by signal N (as ``sh``'s ``wait`` reports it).

Nothing runs before the fork but imports: no thread, no CUDA, no process group. Users' launches (the deepspeed
launcher, torchrun) are exercised by the tests that name them.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback

import deepspeed.runtime.engine  # noqa: F401  (imported by deepspeed.initialize otherwise, in every rank)

import livt_ds.__main__
import livt_ds.cli

MAIN = livt_ds.__main__.__file__


def exit_code(exc: SystemExit) -> int:
    """The status the interpreter gives ``raise SystemExit(code)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_rank(rank: int, args: list[str]) -> None:
    """In the forked child: be rank ``rank`` of `livt ARGS`, then end the process (never returns)."""
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    sys.argv = [MAIN, *args]
    try:
        code = livt_ds.cli.main(args)
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> int:
    ranks, args = int(argv[0]), argv[1:]
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(ranks):
        pid = os.fork()
        if pid == 0:
            run_rank(rank, args)
        pids.append(pid)
    codes = []
    for pid in pids:
        status = os.waitpid(pid, 0)[1]
        codes.append(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
