"""A bounded local cache of remote shards (``data.cache_dir``): later epochs read them from disk.

A shard is downloaded (with the retries of :class:`~livt_ds.data.remote.ResumableStream`) into a temporary
``.tmp-<host>-<pid>-<random>`` file in the cache folder and renamed to its final name only when complete
(``os.replace`` is atomic on one filesystem), so ranks and workers sharing a folder on one node never see a torn
file; two that fetch the same shard at once both write complete copies and the last rename wins. Names are
``<sha256(url)[:16]>-<file name>``. After each download the least recently used shards (by mtime, touched on
every hit) are removed until the folder holds at most ``cache_max_bytes`` (the shard just written stays even if
it alone is larger). A reader that still has an evicted file open keeps reading it (POSIX unlink semantics).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from livt_ds.data.remote import BUFFER_BYTES, RemoteOptions, ResumableStream, is_url, open_url

STALE_TMP_S = 6 * 3600  # a temporary file this old belongs to a dead download


def cache_name(url: str) -> str:
    """File name of ``url`` in the cache: a hash of the whole URL plus its last component (readable)."""
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{tail}"


def fetch(url: str, options: RemoteOptions) -> Path:
    """The cached copy of ``url``, downloaded first when absent; raises ShardUnavailable/ShardMissing."""
    folder = Path(options.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / cache_name(url)
    try:
        os.utime(path)  # a hit: mark as recently used
        return path
    except FileNotFoundError:
        pass
    tmp = folder / f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with ResumableStream(url, options) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, BUFFER_BYTES)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    evict(folder, options.cache_max_bytes, keep=path)
    return path


def open_shard(location: str | Path, options: RemoteOptions) -> BinaryIO:
    """A reader of one shard: the cached copy of a remote one when ``options.cache_dir`` is set, else the location
    itself (:func:`~livt_ds.data.remote.open_url`)."""
    if options.cache_dir and is_url(location):
        return open_cached(str(location), options)
    return open_url(location, options)


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
