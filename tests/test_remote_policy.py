"""The retry policy of remote reads (doubling waits, their cap, which HTTP answers are retried) and the cache's
least-recently-used eviction order, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import time

import pytest
from httpserver import serve

from livt_ds.data import remote
from livt_ds.data.cache import cache_name, evict, fetch
from livt_ds.data.remote import RemoteOptions, ShardMissing, ShardUnavailable, open_url


class _Midpoint:
    """Jitter at the middle of its range (x 1.0), so that each wait is its nominal value."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return (low + high) / 2


@pytest.fixture()
def waits(monkeypatch) -> list[float]:
    """The waits between tries, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(remote.time, "sleep", slept.append)
    return slept


def test_waits_double_from_the_backoff_and_stop_at_the_cap(tmp_path, monkeypatch, waits):
    (tmp_path / "a.tar").write_bytes(b"x" * 100)
    monkeypatch.setattr(remote, "MAX_WAIT_S", 0.4)
    monkeypatch.setattr(remote, "_jitter", _Midpoint())
    with serve(tmp_path, fail={"/a.tar": 503}) as srv:
        with pytest.raises(ShardUnavailable, match="gave up after 6 tries"):
            open_url(f"{srv.url}/a.tar", RemoteOptions(retries=5, backoff_s=0.1, timeout_s=10))
        assert srv.requests["/a.tar"] == 6  # the first try and 5 retries
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.4])  # 0.1 x 2^k, capped at MAX_WAIT_S


def test_jitter_keeps_each_wait_within_half_and_one_and_a_half_times_its_nominal_value(tmp_path, waits):
    (tmp_path / "a.tar").write_bytes(b"x" * 100)
    with serve(tmp_path, fail={"/a.tar": 500}) as srv:
        with pytest.raises(ShardUnavailable):
            open_url(f"{srv.url}/a.tar", RemoteOptions(retries=4, backoff_s=1.0, timeout_s=10))
    nominal = [1.0, 2.0, 4.0, 8.0]
    assert len(waits) == 4 and all(0.5 * n <= w <= 1.5 * n for w, n in zip(waits, nominal)), waits
    assert len(set(waits)) == 4  # drawn, not fixed


@pytest.mark.parametrize(("code", "retried", "error"), [
    (408, True, ShardUnavailable), (429, True, ShardUnavailable), (500, True, ShardUnavailable),
    (503, True, ShardUnavailable), (404, False, ShardMissing), (410, False, ShardMissing),
    (403, False, ShardUnavailable), (400, False, ShardUnavailable),
])  # fmt: skip
def test_which_http_answers_are_retried(tmp_path, waits, code, retried, error):
    (tmp_path / "a.tar").write_bytes(b"x" * 100)
    with serve(tmp_path, fail={"/a.tar": code}) as srv:
        with pytest.raises(error) as caught:
            open_url(f"{srv.url}/a.tar", RemoteOptions(retries=2, backoff_s=0.01, timeout_s=10))
        assert srv.requests["/a.tar"] == (3 if retried else 1)
    assert len(waits) == (2 if retried else 0)
    assert isinstance(caught.value, ShardMissing) == (code in (404, 410))
    assert str(code) in str(caught.value) and ("gave up after 3 tries" in str(caught.value)) == retried


def test_a_retried_answer_that_clears_gives_the_whole_file(tmp_path, monkeypatch):
    data = os.urandom(5000)
    (tmp_path / "a.tar").write_bytes(data)
    with serve(tmp_path, fail={"/a.tar": 429}) as srv:
        options = RemoteOptions(retries=3, backoff_s=0.01, timeout_s=10)
        waits_before_clear = []

        def sleep_then_clear(seconds: float) -> None:
            waits_before_clear.append(seconds)
            srv.fail.clear()  # the server stops throttling after the first answer

        monkeypatch.setattr(remote.time, "sleep", sleep_then_clear)
        with open_url(f"{srv.url}/a.tar", options) as f:
            assert f.read() == data
        assert srv.requests["/a.tar"] == 2 and len(waits_before_clear) == 1


def _touch(path, when: float) -> None:
    os.utime(path, (when, when))


def test_cache_evicts_the_least_recently_used_first(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    now = time.time()
    for age, name in ((50, "old"), (40, "older_use"), (30, "mid"), (20, "new")):
        (folder / name).write_bytes(b"x" * 100)
        _touch(folder / name, now - age)
    _touch(folder / "old", now - 10)  # used again lately: now the most recently used
    (folder / ".tmp-host-1-abc").write_bytes(b"x" * 1000)  # a download in progress: neither counted nor removed
    assert evict(folder, 250) == ["older_use", "mid"]  # 400 bytes -> 200: the two least recently used go
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-host-1-abc", "new", "old"]
    assert evict(folder, 0, keep=folder / "new") == ["old"]  # the file just written stays even alone too large
    assert evict(folder, 1000) == []


def test_a_cache_hit_makes_a_shard_the_most_recently_used(tmp_path):
    shards = tmp_path / "served"
    shards.mkdir()
    for i in range(3):
        (shards / f"s{i}.tar").write_bytes(os.urandom(1000))
    with serve(shards) as srv:
        options = RemoteOptions(retries=1, backoff_s=0.01, cache_dir=str(tmp_path / "c"), cache_max_bytes=2500)
        urls = [f"{srv.url}/s{i}.tar" for i in range(3)]
        fetch(urls[0], options)
        fetch(urls[1], options)
        _touch(tmp_path / "c" / cache_name(urls[0]), time.time() - 100)
        _touch(tmp_path / "c" / cache_name(urls[1]), time.time() - 50)
        fetch(urls[0], options)  # a hit: s0 is now the most recently used, s1 the least
        assert srv.requests["/s0.tar"] == 1
        fetch(urls[2], options)  # 3000 bytes > 2500: one must go, the least recently used
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(cache_name(u) for u in (urls[0], urls[2]))
