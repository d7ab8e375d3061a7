"""The suite's cheap launch: ``python tests/fork_ranks.py N ARGS...`` runs `livt ARGS` on N CPU ranks, as N
processes forked from this one after it has imported the package (torch, torchvision, timm, DeepSpeed: about 4 CPU
seconds that each rank of ``python -m livt_ds`` pays again). Each rank gets the variables torchrun would set (RANK,
LOCAL_RANK; WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the caller), runs
``livt_ds.cli.main(ARGS)`` and exits as the interpreter would: atexit handlers run, streams flushed, an uncaught
exception printed with exit code 1. N = 0 runs one process without those variables, as ``python -m livt_ds ARGS``.
The ranks stay in this process's group (one kill ends the launch); the exit code is the first failing rank's,
128 + N for a rank killed by signal N (as ``sh``'s ``wait`` reports it).

``python tests/fork_ranks.py --serve FD`` imports once for a whole pytest process and serves launch requests
(tests/fork_client.py) on the listening Unix socket FD: for each it forks a launch process that joins the client's
process group (a kill of the test's launch group ends every rank, as above), takes the client's stdin, stdout,
stderr, directory and environment, forks the ranks and sends their exit code back. A request whose environment
differs from the server's in more than a launch's own variables is refused (a module may have read a variable at
import), and the client runs ``fork_ranks.py`` itself.

Nothing runs before a fork but imports: no thread, no CUDA, no process group. Users' launches (the deepspeed
launcher, torchrun) are exercised by the tests that name them.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import traceback

# What may differ between the server's environment and a launch's: the launch's own variables, pytest's name of the
# running test, and what the `sh -c` in front of a launch exports (PWD; bash also SHLVL and _).
LAUNCH_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "PYTEST_CURRENT_TEST", "PWD", "SHLVL", "_"}


def import_package() -> dict[str, str]:
    """Import what every rank would (before any fork); return the variables the imports set (DeepSpeed and torch
    set a few in os.environ)."""
    before = dict(os.environ)
    import deepspeed.runtime.engine  # noqa: F401  (imported by deepspeed.initialize otherwise, in every rank)

    import livt_ds.__main__  # noqa: F401
    import livt_ds.cli  # noqa: F401

    return {key: value for key, value in os.environ.items() if before.get(key) != value}


def exit_code(exc: SystemExit) -> int:
    """The status the interpreter gives ``raise SystemExit(code)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_rank(rank: int | None, args: list[str]) -> None:
    """In the forked child: be rank ``rank`` of `livt ARGS` (None: a plain `livt ARGS`, no launcher's variables),
    then end the process (never returns)."""
    import livt_ds.__main__
    import livt_ds.cli

    if rank is not None:
        os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    sys.argv = [livt_ds.__main__.__file__, *args]
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
    """``N ARGS...``: fork the ranks (the package imported), wait for all of them, return the launch's exit code."""
    ranks, args = int(argv[0]), argv[1:]
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(max(ranks, 1)):
        pid = os.fork()
        if pid == 0:
            run_rank(rank if ranks else None, args)
        pids.append(pid)
    codes = []
    for pid in pids:
        status = os.waitpid(pid, 0)[1]
        codes.append(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    return next((code for code in codes if code), 0)


def same_environment(env: dict[str, str], imported_with: dict[str, str]) -> bool:
    """Whether a launch with ``env`` would import the package under the variables this process imported it with."""
    def kept(variables: dict[str, str]) -> dict[str, str]:
        return {key: value for key, value in variables.items() if key not in LAUNCH_VARIABLES}

    return kept(env) == kept(imported_with)


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request: an 8-byte length, then that many bytes of JSON; the client's stdin/stdout/stderr ride along."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "big"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the client hung up mid-request")
        data += chunk
    return json.loads(data[8:]), fds


def waiting(pid: int, pgid: int) -> bool:
    """True while the client ``pid`` lives (not a zombie) in group ``pgid``."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[2]) == pgid


def run_launch(conn: socket.socket, request: dict, fds: list[int], set_by_imports: dict[str, str]) -> None:
    """In the forked launch process: become the client's launch, fork its ranks, send back their exit code; then
    end the process (never returns into the server's loop)."""
    try:
        os.setpgid(0, request["pgid"])  # the test kills its launch's group: that must end us and our ranks too
        if waiting(request["pid"], request["pgid"]):  # else the group was killed before we joined it
            conn.sendall(b"A")
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            os.environ.update(set_by_imports)
            conn.sendall(bytes([main(request["argv"])]))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(0)


def serve(listen_fd: int) -> int:
    """Serve launch requests until the pytest process that started us is gone."""
    imported_with = dict(os.environ)
    set_by_imports = import_package()
    server = socket.socket(fileno=listen_fd)
    server.settimeout(1.0)
    parent = os.getppid()
    while os.getppid() == parent:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap the launches that ended
                pass
        except ChildProcessError:
            pass
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        fds = []
        with conn:
            try:
                request, fds = receive(conn)
                if not same_environment(request["env"], imported_with) or len(fds) != 3:
                    conn.sendall(b"R")
                elif os.fork() == 0:
                    server.close()
                    run_launch(conn, request, fds, set_by_imports)
            except (OSError, ValueError) as exc:  # a client that died mid-request, or sent garbage
                print(f"fork server: request dropped: {exc}", file=sys.stderr)
            for fd in fds:
                os.close(fd)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        raise SystemExit(serve(int(sys.argv[2])))
    import_package()
    raise SystemExit(main(sys.argv[1:]))
