"""Shard sets behind URLs: one opener for ``meta.json`` and the shards, with retries, resume and an optional cache.

A shard set location (``data.path``, ``--verify``, any ``shard_dir`` argument) is one of

- a local folder (``shards/x``; ``file:///abs/shards/x`` too);
- ``http://`` / ``https://``: read with the standard library (urllib). A dropped download continues at the byte
  where it stopped with a ``Range`` request (or, from a server without ranges, from the start with the bytes
  already read discarded). No extra dependency;
- ``s3://``, ``gs://``, ``az://`` ... any fsspec protocol (fsspec comes with torch; the protocol's own package is
  an optional extra: ``pip install 'livt-ds[s3]'`` or ``'livt-ds[gcs]'``); a retry reopens and seeks;
- ``pipe:COMMAND`` where ``{}`` in COMMAND stands for the file name (``pipe:aws s3 cp s3://bucket/set/{} -``),
  run through WebDataset's pipe opener; a retry reruns the command and discards the bytes already read.

Shard names in meta.json resolve relative to its location (:func:`join`). A failed read (connection refused or
dropped, timeout, HTTP 5xx/408/429, a pipe's non-zero exit) is retried up to ``retries`` times per file with
doubling waits, and continues at the byte where it stopped, so a retried shard yields exactly the bytes of a
local read. After the last retry :class:`ReadGaveUp` (a :class:`ShardUnavailable`) is raised; a missing file (HTTP
404/410, no such object) raises :class:`ShardMissing` at once, as do other HTTP 4xx answers
(:class:`ShardUnavailable`).
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import logging
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from livt_ds.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

BUFFER_BYTES = 1 << 20
MAX_WAIT_S = 60.0
_jitter = random.SystemRandom()  # never the global RNG: the training stream's seeds must not move


class ShardUnavailable(OSError):
    """A file of a shard set could not be read, after the retries where retrying makes sense."""


class ShardMissing(ShardUnavailable, FileNotFoundError):
    """A file of a shard set does not exist (HTTP 404/410, no such object or file)."""


class ReadGaveUp(ShardUnavailable):
    """A read that still failed after its ``retries`` (refused or dropped connections, timeouts, HTTP 5xx)."""


class DataSourceOutage(OSError):
    """Reads of several shards in a row gave up after their retries: the source of the shard set, not one file, is
    failing. The trainer saves a checkpoint and stops (see engine.py); the message names the URL and the cause."""

    def __str__(self) -> str:
        text = super().__str__()
        if "Original Traceback" in text:  # re-raised by a DataLoader from its worker: the worker's own message
            text = text.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        return text


_DATA = DataConfig()


def _gigabytes(size_gb: float) -> int:
    return int(size_gb * 1e9)


@dataclass(frozen=True)
class RemoteOptions:
    """How remote files are read: retries, waits, timeout, and the optional local cache (``cache_dir``)."""

    # defaults: the recipe's (DataConfig is their one home)
    retries: int = _DATA.retries  # further tries of one file after a failed open or read
    backoff_s: float = _DATA.retry_backoff_s  # first retry's wait; doubles (capped at MAX_WAIT_S), +-50 % jitter
    timeout_s: float = _DATA.timeout_s  # connect / read timeout of one HTTP request
    cache_dir: str = _DATA.cache_dir  # "" = no cache
    cache_max_bytes: int = _gigabytes(_DATA.cache_max_gb)
    # shard location -> (bytes, sha256) from the set's meta.json: what the cache checks its copies against
    shard_files: dict[str, tuple[int, str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0 or self.cache_max_bytes < 0:
            raise ValueError(f"{self}: need retries >= 0, retry_backoff_s >= 0, timeout_s > 0, cache_max_gb >= 0")

    @classmethod
    def from_config(cls, data: Any) -> RemoteOptions:
        """From a recipe's ``data`` section (``retries``, ``retry_backoff_s``, ``timeout_s``, ``cache_*``);
        a ConfigError naming the keys when a value is out of range."""
        try:
            return cls(retries=data.retries, backoff_s=data.retry_backoff_s, timeout_s=data.timeout_s,
                       cache_dir=data.cache_dir, cache_max_bytes=_gigabytes(data.cache_max_gb))  # fmt: skip
        except ValueError as exn:
            raise ConfigError(f"data.retries / retry_backoff_s / timeout_s / cache_max_gb: {exn}") from None


    def expecting(self, shard_files: dict[str, tuple[int, str]]) -> RemoteOptions:
        """These options, with the sizes and digests of a set's shards (``shards.shard_files``) added."""
        return dataclasses.replace(self, shard_files={**self.shard_files, **shard_files})


DEFAULT_OPTIONS = RemoteOptions()


# Credential errors of the optional storage clients (botocore, google-auth, azure-core), known by name: the
# packages themselves need not be installed for livt-ds to tell a missing credential from a bug.
CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                               "DefaultCredentialsError", "RefreshError", "ClientAuthenticationError"})


def is_credentials_error(exn: BaseException) -> bool:
    """True for a storage client's "no / bad credentials" error (botocore's NoCredentialsError ...)."""
    return any(cls.__name__ in CREDENTIAL_ERRORS for cls in type(exn).__mro__)


# ---------------------------------------------------------------------------------------------- locations
def is_url(location: str | Path) -> bool:
    """True for ``scheme://...`` (``file://`` excluded) and ``pipe:...`` locations."""
    text = str(location)
    return text.startswith("pipe:") or ("://" in text and not text.startswith("file://"))


def local_path(location: str | Path) -> Path:
    """A local location as a Path (``file://`` stripped)."""
    return Path(re.sub(r"^file://", "", str(location)))


def join(base: str | Path, name: str) -> str:
    """Location of file ``name`` of the shard set at ``base`` (``{}`` of a ``pipe:`` pattern filled in)."""
    text = str(base)
    if text.startswith("pipe:"):
        if "{}" not in text:
            raise ValueError(f"{text}: a pipe: location needs {{}} where the file name goes, "
                             "e.g. 'pipe:aws s3 cp s3://bucket/set/{} -'")  # fmt: skip
        return text.replace("{}", name)
    if is_url(text):
        return text.rstrip("/") + "/" + name
    return str(local_path(text) / name)


# ---------------------------------------------------------------------------------------------- transports
def _discard(stream: Any, count: int) -> None:
    """Read and drop ``count`` bytes (a transport that cannot start mid-file); OSError on an early end."""
    while count:
        data = stream.read(min(count, BUFFER_BYTES))
        if not data:
            raise ConnectionError(f"ended {count} bytes before the resume point")
        count -= len(data)


def _open_http(url: str, offset: int, timeout: float) -> tuple[Any, int | None]:
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only, checked by caller
    except urllib.error.HTTPError as exn:
        if exn.code in (404, 410):
            raise ShardMissing(f"{url}: not found (HTTP {exn.code})") from None
        if 400 <= exn.code < 500 and exn.code not in (408, 429):
            raise ShardUnavailable(f"{url}: HTTP {exn.code} {exn.reason} (not retried)") from None
        raise  # 5xx, 408, 429: retried
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            response.close()
            raise ConnectionError(f"{url}: asked for bytes {offset}-, got Content-Range "
                                  f"{response.headers.get('Content-Range')!r}")  # fmt: skip
        return response, None if match.group(2) == "*" else int(match.group(2))
    length = response.headers.get("Content-Length")
    if offset:  # the server ignored the Range header: skip what was read before
        _discard(response, offset)
    return response, int(length) if length else None


def _open_fsspec(url: str, offset: int, timeout: float) -> tuple[Any, int | None]:  # noqa: ARG001 - fs's own
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exn:
        raise ShardUnavailable(f"{url}: {exn}; for s3:// install 'livt-ds[s3]' (s3fs), for gs:// 'livt-ds[gcs]' "
                               "(gcsfs), or read it with a pipe: command") from None  # fmt: skip
    try:
        stream = fs.open(path, "rb")
    except FileNotFoundError:
        raise ShardMissing(f"{url}: not found") from None
    except Exception as exn:
        if is_credentials_error(exn):
            raise ShardUnavailable(f"{url}: no usable credentials ({type(exn).__name__}: {exn}); configure them for "
                                   f"{url.split('://')[0]}:// (for s3://: AWS_PROFILE or ~/.aws/credentials), or "
                                   "read the set through a pipe: command") from None  # fmt: skip
        raise
    if offset:
        stream.seek(offset)
    return stream, getattr(stream, "size", None)


def _open_pipe(url: str, offset: int, timeout: float) -> tuple[Any, int | None]:  # noqa: ARG001 - the command's
    from webdataset.gopen import gopen_pipe

    stream = gopen_pipe(url, "rb")
    if offset:
        _discard(stream, offset)
    return stream, None


def _transport(url: str) -> Callable[[str, int, float], tuple[Any, int | None]]:
    if url.startswith("pipe:"):
        return _open_pipe
    if url.startswith(("http://", "https://")):
        return _open_http
    return _open_fsspec


# ---------------------------------------------------------------------------------------------- reading
class ResumableStream(io.RawIOBase):
    """Read-only bytes of one remote file; a failed read reconnects at the current byte (bounded retries).

    ``size`` (when the transport tells it) turns a connection closed early into a retried failure instead of a
    silent end of file (``http.client`` returns b"" in that case).
    """

    def __init__(self, url: str, options: RemoteOptions = DEFAULT_OPTIONS):
        super().__init__()
        self.url, self.options, self._open_at = url, options, _transport(url)
        self.pos, self.size, self.retries_used = 0, None, 0
        self._raw: Any = None
        self._with_retries(self._connect)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        return self._with_retries(lambda: self._read_into(view))

    def close(self) -> None:
        self._close_raw()
        super().close()

    def _connect(self) -> None:
        raw, size = self._open_at(self.url, self.pos, self.options.timeout_s)
        if size is not None and self.size is not None and size != self.size:
            raw.close()
            raise ShardUnavailable(f"{self.url}: changed while being read ({self.size} -> {size} bytes)")
        self._raw, self.size = raw, size if size is not None else self.size

    def _read_into(self, view: memoryview) -> int:
        if self._raw is None:
            self._connect()
        if hasattr(self._raw, "readinto"):
            n = self._raw.readinto(view)
        else:
            data = self._raw.read(len(view))
            n = len(data)
            view[:n] = data
        if not n and len(view) and self.size is not None and self.pos < self.size:
            raise ConnectionError(f"connection closed at byte {self.pos} of {self.size}")
        self.pos += n
        return n

    def _with_retries(self, action: Callable[[], Any]) -> Any:
        while True:
            try:
                return action()
            except (ShardUnavailable, FileNotFoundError, PermissionError):
                self._close_raw()
                raise
            except (OSError, http.client.HTTPException, EOFError) as exn:
                self._close_raw()
                self._wait_or_give_up(exn)

    def _wait_or_give_up(self, exn: BaseException) -> None:
        where = f"at byte {self.pos}" + (f" of {self.size}" if self.size is not None else "")
        if self.retries_used >= self.options.retries:
            tries = self.retries_used + 1
            raise ReadGaveUp(f"{self.url}: gave up after {tries} tries, {where}: {exn!r}") from exn
        wait = min(MAX_WAIT_S, self.options.backoff_s * 2**self.retries_used) * _jitter.uniform(0.5, 1.5)
        self.retries_used += 1
        logger.warning("%s: %r %s; retry %d/%d in %.2f s", self.url, exn, where, self.retries_used,
                       self.options.retries, wait)  # fmt: skip
        time.sleep(wait)

    def _close_raw(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass


def open_url(location: str | Path, options: RemoteOptions = DEFAULT_OPTIONS) -> BinaryIO:
    """A buffered binary reader of a local path or URL; remote ones resume and retry (see the module docstring).

    With ``options.cache_dir`` a remote file is first copied into the cache (see :mod:`livt_ds.data.cache`)
    and read from there. Raises :class:`ShardMissing` / :class:`ShardUnavailable`.
    """
    if not is_url(location):
        try:
            return open(local_path(location), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise ShardMissing(f"{local_path(location)}: missing") from None
    url = str(location)
    if options.cache_dir:
        from livt_ds.data.cache import open_cached

        return open_cached(url, options)
    return io.BufferedReader(ResumableStream(url, options), buffer_size=BUFFER_BYTES)


def read_bytes(location: str | Path, options: RemoteOptions = DEFAULT_OPTIONS) -> bytes:
    """The whole content of a local path or URL (e.g. meta.json), read through :func:`open_url`."""
    with open_url(location, dataclasses.replace(options, cache_dir="")) as f:  # small files: never cached
        return f.read()


# ---------------------------------------------------------------------------------------------- writing
def upload_file(local: str | Path, url: str) -> None:
    """Copy one local file to ``url``: fsspec protocols (``s3://``, ``gs://``, ``memory://`` ...) or a ``pipe:``
    command that reads the file's bytes on stdin (``pipe:aws s3 cp - s3://bucket/set/{}``, ``{}`` already filled).

    http(s) has no standard upload: write locally and copy the folder with your storage's tool (meta.json last).
    """
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen_pipe

        stream = gopen_pipe(url, "wb")
        with open(local, "rb") as src:
            while chunk := src.read(BUFFER_BYTES):
                stream.write(chunk)
        stream.close()  # waits for the command; raises on a non-zero exit
        return
    if url.startswith(("http://", "https://")):
        raise ValueError(f"{url}: uploading over http(s) is not supported; write to a local --output and copy the "
                         "folder with your storage's tool, meta.json last")  # fmt: skip
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.put_file(str(local), path)


def remote_exists(url: str) -> bool:
    """Whether ``url`` exists (fsspec protocols only; http(s) and pipe: say False: they cannot be asked cheaply)."""
    if url.startswith(("pipe:", "http://", "https://")):
        return False
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def remove_remote(url: str) -> None:
    """Remove ``url`` when it exists (fsspec protocols only)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


def list_remote(url: str, pattern: str) -> list[str] | None:
    """File names under folder ``url`` matching glob ``pattern``; None where a listing is not possible."""
    if url.startswith(("pipe:", "http://", "https://")):
        return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.glob(path.rstrip("/") + "/" + pattern))
