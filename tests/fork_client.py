"""Client of the fork server (``tests/fork_ranks.py --serve``): ``python tests/fork_client.py SOCKET N ARGS...`` has
the server fork the launch ``fork_ranks.py N ARGS`` from its imported copy of the package, in this process's group,
with this process's stdin/stdout/stderr, directory and environment, and exits with the launch's code. Without a
server, or refused by it, it becomes ``python tests/fork_ranks.py N ARGS``. Imports nothing heavy: milliseconds.
"""

from __future__ import annotations

import json
import os
import socket
import sys

FORK_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fork_ranks.py")


def through_server(path: str, launch: list[str]) -> int | None:
    """The launch's exit code, or None when the server did not run it."""
    request = json.dumps({"argv": launch, "env": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid(),
                          "pgid": os.getpgid(0)}).encode()
    message = len(request).to_bytes(8, "big") + request
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(path)
            sent = socket.send_fds(conn, [message], [0, 1, 2])
            conn.sendall(message[sent:])
            if conn.recv(1) != b"A":  # refused, or the server is gone: nothing ran
                return None
        except OSError:
            return None
        code = conn.recv(1)
    if not code:
        print("fork server: the launch process ended without an exit code", file=sys.stderr)
        return 1
    return code[0]


def main(argv: list[str]) -> int:
    code = through_server(argv[0], argv[1:])
    if code is None:
        os.execv(sys.executable, [sys.executable, FORK_RANKS, *argv[1:]])
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
