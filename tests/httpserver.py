"""A real HTTP server for tests (http.server in a thread, 127.0.0.1 only) with injectable faults.

It serves the files under ``root`` with byte ``Range`` support (``bytes=N-``) and can, per request:
drop every ``drop_every``-th request for a ``.tar`` file mid-body (headers promise the full length, half the
body is sent, the connection closes), answer ``fail[path]`` (e.g. 404 / 500) for given paths, or stall
``stall_s`` seconds before answering paths in ``stall``, or answer 503 to every ``.tar`` request after the first
``down_after`` (an outage). It stops when the ``with`` block ends, and in any case
after ``lifetime_s`` seconds.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# The test ranks and the in-process readers must reach 127.0.0.1 directly, whatever proxy the machine sets.
os.environ["no_proxy"] = os.environ["NO_PROXY"] = ",".join(
    filter(None, [os.environ.get("no_proxy", ""), "127.0.0.1", "localhost"])
)


class FaultyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, *, drop_every: int = 0, fail: dict[str, int] | None = None, ranges: bool = True,
                 stall: tuple[str, ...] = (), stall_s: float = 0.0, down_after: int | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.drop_every, self.fail, self.ranges = Path(root).resolve(), drop_every, fail or {}, ranges
        self.stall, self.stall_s, self.down_after = stall, stall_s, down_after
        self.lock = threading.Lock()
        self.tar_requests = 0
        self.drops = 0
        self.requests: Counter = Counter()  # path -> number of GET requests
        self.range_requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        """A client that hung up mid-answer (a reader that timed out, a rank that was killed) is part of the
        tests, not a server error: no traceback for it. Anything else is printed as usual."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FaultyServer
    timeout = 30  # a client that stops reading cannot hold a thread for longer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests[path] += 1
            drop = down = False
            if path.endswith(".tar"):
                srv.tar_requests += 1
                drop = srv.drop_every > 0 and srv.tar_requests % srv.drop_every == 0
                down = srv.down_after is not None and srv.tar_requests > srv.down_after
        if down:
            self.send_error(503)
            return
        if path in srv.stall:
            time.sleep(srv.stall_s)
        if path in srv.fail:
            self.send_error(srv.fail[path])
            return
        file = (srv.root / path.lstrip("/")).resolve()
        if srv.root not in file.parents or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and srv.ranges:
            start = int(match.group(1))
            with srv.lock:
                srv.range_requests += 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop and len(body) > 1:
            with srv.lock:
                srv.drops += 1
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True  # the connection ends mid-body
            return
        self.wfile.write(body)


@contextlib.contextmanager
def serve(root: Path, *, lifetime_s: float = 600, **faults) -> Iterator[FaultyServer]:
    """Serve ``root`` on 127.0.0.1 (an ephemeral port) while the block runs, at most ``lifetime_s`` seconds."""
    server = FaultyServer(root, **faults)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    stopped = threading.Lock()

    def stop() -> None:  # the listening socket closes too: late clients are refused at once, never left waiting
        with stopped:
            if server.socket.fileno() != -1:
                server.shutdown()
                server.server_close()

    timer = threading.Timer(lifetime_s, stop)
    timer.daemon = True
    timer.start()
    try:
        yield server
    finally:
        timer.cancel()
        stop()
        thread.join(timeout=10)
