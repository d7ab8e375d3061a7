"""A bounded local cache of remote shards (``data.cache_dir``): later epochs read them from disk.

A shard is downloaded (with the retries of :class:`~livt_ds.data.remote.ResumableStream`) into a temporary
``.tmp-<host>-<pid>-<random>`` file in the cache folder and renamed to its final name only when complete
(``os.replace`` is atomic on one filesystem), so ranks and workers sharing a folder on one node never see a torn
file; two that fetch the same shard at once both write complete copies and the last rename wins. Names are
``<sha256(url)[:16]>-<file name>``, with the first digits of the shard's own sha256 in between where meta.json
records it: a download is checked against meta.json's size and sha256 before it enters the cache, and an entry of
the wrong size is fetched again. After each download the least recently used shards (by mtime, touched on
every hit) are removed until the folder holds at most ``cache_max_bytes`` (the shard just written stays even if
it alone is larger). A reader that still has an evicted file open keeps reading it (POSIX unlink semantics).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from livt_ds.data.remote import BUFFER_BYTES, RemoteOptions, ResumableStream, ShardUnavailable

logger = logging.getLogger(__name__)

STALE_TMP_S = 6 * 3600  # a temporary file this old belongs to a dead download


class CachedCopyMismatch(ShardUnavailable):
    """A downloaded shard is not the file its set's meta.json describes (another size or sha256)."""


def cache_name(url: str, sha256: str | None = None) -> str:
    """File name of ``url`` in the cache: a hash of the whole URL, the first digits of the file's sha256 when
    meta.json gives it (a shard rebuilt on the server gets a new entry), and its last component (readable)."""
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    content = f"{sha256[:16]}-" if sha256 else ""
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{content}{tail}"


def fetch(url: str, options: RemoteOptions) -> Path:
    """The cached copy of ``url``, downloaded first when absent or wrong; raises ShardUnavailable/ShardMissing.

    Where the set's meta.json gives the shard's size and sha256 (``options.shard_files``), a download is kept only
    when both match (else :class:`CachedCopyMismatch`), and a copy of another size (cut short on disk) is fetched
    again."""
    folder = Path(options.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    size, sha256 = options.shard_files.get(url, (None, None))
    path = folder / cache_name(url, sha256)
    try:
        if size is None or path.stat().st_size == size:
            os.utime(path)  # a hit: mark as recently used
            return path
        logger.warning("%s: the cached copy %s has %d bytes, meta.json says %d; fetching it again", url, path,
                       path.stat().st_size, size)  # fmt: skip
    except FileNotFoundError:
        pass
    tmp = folder / f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with ResumableStream(url, options) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, BUFFER_BYTES)
        if sha256 is not None:
            _check_download(url, tmp, size, sha256)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    evict(folder, options.cache_max_bytes, keep=path)
    return path


def _check_download(url: str, tmp: Path, size: int, sha256: str) -> None:
    got_size = tmp.stat().st_size
    with open(tmp, "rb") as f:
        got = hashlib.file_digest(f, "sha256").hexdigest()
    if (got_size, got) != (size, sha256):
        raise CachedCopyMismatch(f"{url}: downloaded {got_size} bytes with sha256 {got[:16]}..., but the set's "
                                 f"meta.json lists {size} bytes, sha256 {sha256[:16]}...: the server's copy is not "
                                 "the file the set was made with; not cached (re-upload the shard, or the whole set "
                                 "with its meta.json)")  # fmt: skip


def open_cached(url: str, options: RemoteOptions) -> BinaryIO:
    """Open the cached copy of ``url`` (fetched when absent; fetched again if evicted before it was opened)."""
    for _ in range(3):
        path = fetch(url, options)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:  # another process evicted it in between
            continue
    raise OSError(f"{url}: evicted from {options.cache_dir} three times before it could be read; raise "
                  "data.cache_max_gb")  # fmt: skip


def evict(folder: Path, max_bytes: int, keep: Path | None = None) -> list[str]:
    """Remove least recently used files until ``folder`` holds at most ``max_bytes``; returns the removed names."""
    now, files = time.time(), []
    for entry in os.scandir(folder):
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue
        if entry.name.startswith(".tmp-"):
            if now - stat.st_mtime > STALE_TMP_S:
                Path(entry.path).unlink(missing_ok=True)
            continue
        if entry.is_file():
            files.append((stat.st_mtime, stat.st_size, entry.name))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, name in sorted(files):
        if total <= max_bytes:
            break
        if keep is not None and name == keep.name:
            continue
        (folder / name).unlink(missing_ok=True)  # another rank may have removed it already
        total -= size
        removed.append(name)
    return removed
