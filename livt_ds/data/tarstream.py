"""The members of a tar stream, read with a few slices per 512-byte header instead of ``tarfile``'s full parse.

At pre-resized shards (``--max-side 256``) Python's ``tarfile`` in stream mode (what webdataset uses) costs about as
much per sample as decoding the JPEG: two members per sample, each with the PAX header webdataset's writer adds for
the fractional mtime, each parsed field by field. A training stream needs only each regular file's name and bytes.
This reader understands ustar / GNU / PAX archives (prefix field, PAX ``path`` and ``size`` records, GNU long names),
checks each header's checksum and reads gzip-compressed tars; it yields what ``webdataset``'s
``tar_file_expander`` yields, so webdataset's ``group_by_keys`` groups its output as before.

Damage behaves as with ``tarfile``: a zero block or the end of the stream at a header ends the archive; a member cut
short is yielded with the bytes that exist, then ``tarfile.ReadError`` goes to the handler; a header whose checksum
is wrong raises ``tarfile.ReadError`` to the handler. Either ends the read of that shard.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: names like __key__ are not sample files


def _read(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only at the end of the stream (``read`` may return short chunks)."""
    first = stream.read(size)
    if len(first) == size or not first:
        return first
    chunks, left = [first], size - len(first)
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _byte_sum(block: bytes) -> int:
    """The sum of a header's 512 bytes, exactly: adler32's low half is 1 + the byte sum modulo 65521, and the sum of
    256 bytes stays below 65521 (zlib in C: a tenth of Python's ``sum`` over the bytes)."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _number(field: bytes) -> int:
    """A header number: octal text, or GNU base-256 (first byte 0x80) for large values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """PAX extended-header records ``"%d %s=%s\\n"``."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each regular file; raises ``tarfile.ReadError`` on a bad header or a cut member (after
    yielding the part that exists)."""
    pax: dict[str, str] = {}
    long_name = None
    while True:
        header = _read(stream, BLOCK)
        if len(header) < BLOCK or header == _ZERO:
            return  # the end of the archive (or of the stream, at a member boundary)
        stored = _number(header[148:156])
        if stored != _byte_sum(header) - sum(header[148:156]) + 256:  # the checksum field counts as 8 spaces
            raise tarfile.ReadError("invalid tar header (checksum)")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax and kind in _REGULAR else _number(header[124:136])
        padded = _read(stream, size + -size % BLOCK)  # the member and its padding to the next block, in one read
        data = padded[:size] if len(padded) > size else padded
        cut = len(data) < size
        if kind == b"x":
            pax = _pax(data)
        elif kind == b"L":
            long_name = _text(data)
        elif kind == b"g":
            pass  # global PAX header: nothing a sample needs
        else:
            name = pax.get("path") or long_name or _text(header[:100])
            if "path" not in pax and long_name is None and header[257:262] == b"ustar":
                prefix = _text(header[345:500])
                name = f"{prefix}/{name}" if prefix else name
            pax, long_name = {}, None
            if kind in _REGULAR:
                yield name, data
        if cut:
            raise tarfile.ReadError("unexpected end of data")


def tar_file_samples(stream: BinaryIO, url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` per regular file of the tar in ``stream``, then ``{}`` (the end of the shard),
    as webdataset's ``tar_file_expander`` gives them; an error goes to ``handler`` and ends the shard (re-raised when
    the handler returns False)."""
    try:
        head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
        if head == b"\x1f\x8b" or url.endswith((".gz", ".tgz")):
            stream = gzip.GzipFile(fileobj=stream)
        for name, data in _members(stream):
            if "/" not in name and name.startswith("__") and name.endswith("__") or _META.match(name):
                continue
            yield {"fname": name, "data": data, "__url__": url}
    except Exception as exn:
        exn.args = (*exn.args, url)
        if not handler(exn):
            raise
    yield {}
