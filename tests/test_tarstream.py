"""The fast tar reader gives what tarfile gives: names and bytes of the regular files, PAX / GNU / ustar, gzip."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from livt_ds.data.tarstream import tar_file_samples


def make_tar(fmt: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    files = [("a.jpg", b"x" * 700), ("a.cls", b"3"), ("d" * 120 + "/b.jpg", b"y" * 512),  # long: PAX / GNU / prefix
             ("b.cls", b""), ("__meta__", b"skip me"), ("c.txt", "é".encode() * 300)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("folder")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a fractional mtime: webdataset's writer makes PAX headers
            tar.addfile(info, io.BytesIO(data))
    expected = [(n, d) for n, d in files if n != "__meta__"]
    return buf.getvalue(), expected


def read(data: bytes, url: str = "x.tar") -> tuple[list[tuple[str, bytes]], list[BaseException]]:
    errors = []
    out = list(tar_file_samples(io.BufferedReader(io.BytesIO(data)), url, lambda e: errors.append(e) or True))
    assert out[-1] == {}
    return [(s["fname"], s["data"]) for s in out[:-1]], errors


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])  # ustar: prefix
def test_members_match_tarfile(fmt):
    data, expected = make_tar(fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        reference = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg() and m.name != "__meta__"]
    assert reference == expected
    assert read(data) == (expected, [])
    assert read(gzip.compress(data)) == (expected, [])  # gzip, found by its magic bytes


def test_damage_goes_to_the_handler_and_ends_the_shard():
    data, expected = make_tar(tarfile.PAX_FORMAT)
    bad = bytearray(data)
    bad[512 * 3 + 10] ^= 0xFF  # a later header's name byte: its checksum no longer matches
    got, errors = read(bytes(bad))
    assert len(errors) == 1 and isinstance(errors[0], tarfile.ReadError) and "checksum" in str(errors[0])
    assert got == expected[: len(got)] and len(got) < len(expected)
    cut, errors = read(data[: 512 * 4 + 100])  # inside a.jpg's data: its first bytes come, then the error
    assert cut[-1][0] == "a.jpg" and len(cut[-1][1]) < 700 and isinstance(errors[0], tarfile.ReadError)
    assert read(b"") == ([], []) and read(bytes(4096)) == ([], [])  # empty / zero-filled: an empty archive
