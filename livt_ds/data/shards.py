"""Shard sets on disk: ``NAME/{train,val}-NNNNNN.tar`` (WebDataset) plus ``NAME/meta.json``.

A sample is ``KEY.jpg`` or ``KEY.png`` (the encoded image), ``KEY.cls`` (the label as decimal text) and
``KEY.json`` (``{"src": where it came from, ...}``); keys look like ``train_00000042`` (no dots: WebDataset
splits the extension at the first dot). ``meta.json`` is the contract the rest of the project reads; see
``shards/README.md`` for every key.

Writing is atomic: :class:`ShardSetWriter` fills ``NAME.partial-<host>-<pid>/`` and renames it to ``NAME`` only
after ``meta.json`` is written, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from livt_ds.config import ConfigError
from livt_ds.data.remote import (
    DEFAULT_OPTIONS,
    RemoteOptions,
    ShardMissing,
    ShardUnavailable,
    is_url,
    join,
    list_remote,
    local_path,
    open_url,
    read_bytes,
    remote_exists,
    remove_remote,
    upload_file,
)
from livt_ds.data.tarstream import tar_file_samples
from livt_ds.provenance import pid_alive

FORMAT_VERSION = 1
META_NAME = "meta.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
META_KEYS = ("format_version", "name", "num_classes", "classes", "class_counts", "splits", "mean", "std")
_MAKE_HINT = "run scripts/make_shards.py --source {{imagefolder,list,inat,cifar,demo}} --input PATH --output {dir}"


class ShardSetError(RuntimeError):
    """A shard set folder is missing, incomplete or belongs to another data set; the message says what to do."""


# ---------------------------------------------------------------------------------------------- reading
def load_meta(shard_dir: str | Path, remote: RemoteOptions = DEFAULT_OPTIONS) -> dict:
    """``shard_dir/meta.json`` as a dict; a clear FileNotFoundError/ShardSetError when it is absent or wrong.

    ``shard_dir`` may be a URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:...{}...``): see :mod:`remote`.
    """
    if is_url(shard_dir):
        return _check_meta(_read_remote_meta(str(shard_dir), remote), join(shard_dir, META_NAME), str(shard_dir))
    shard_dir = local_path(shard_dir)
    path = shard_dir / META_NAME
    if not path.is_file():
        partial = sorted(p.name for p in shard_dir.parent.glob(f"{shard_dir.name}.partial-*"))
        note = f" (an interrupted run left {partial[0]}; re-run it)" if partial else ""
        raise FileNotFoundError(f"{path}: missing{note}; {_MAKE_HINT.format(dir=shard_dir)}")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    return _check_meta(meta, str(path), str(shard_dir))


def _read_remote_meta(shard_dir: str, remote: RemoteOptions) -> dict:
    where = join(shard_dir, META_NAME)
    try:
        data = read_bytes(where, remote)
    except ShardMissing as exn:
        raise FileNotFoundError(f"{exn}: no shard set there (an upload writes meta.json last: is it finished?); "
                                f"{_MAKE_HINT.format(dir=shard_dir)}") from None  # fmt: skip
    except ShardUnavailable as exn:
        raise ShardSetError(f"{where}: cannot be read ({exn}); check data.path and the network") from None
    try:
        return json.loads(data)
    except ValueError as exn:
        raise ShardSetError(f"{where}: not JSON ({exn}); check data.path") from None


def _check_meta(meta: dict, path: str, shard_dir: str) -> dict:
    absent = [k for k in META_KEYS if k not in meta]
    if absent:
        hint = _MAKE_HINT.format(dir=shard_dir)
        raise ShardSetError(f"{path}: keys {absent} missing; not a livt-ds shard set, {hint}")
    if meta["format_version"] > FORMAT_VERSION:
        raise ShardSetError(
            f"{path}: format_version {meta['format_version']} is newer than this livt-ds ({FORMAT_VERSION}); update it"
        )
    return meta


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shard_files(shard_dir: str | Path, meta: dict) -> dict[str, tuple[int, str]]:
    """Location of each shard -> (size in bytes, sha256), from meta.json (empty for a set made before they were
    recorded)."""
    out = {}
    for info in meta["splits"].values():
        if "shard_sha256" in info and "shard_bytes" in info:
            for name, size, digest in zip(info["shards"], info["shard_bytes"], info["shard_sha256"]):
                out[join(shard_dir, name)] = (int(size), str(digest))
    return out


def meta_digest(meta: dict) -> str:
    """sha256 of a meta.json's content (canonical JSON): the same for every copy of a shard set, local or remote."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def shard_paths(shard_dir: str | Path, split: str, remote: RemoteOptions = DEFAULT_OPTIONS) -> list[str]:
    """Full paths (or URLs) of the tar files of ``split``, in meta.json order; an error naming the splits there."""
    meta = load_meta(shard_dir, remote)
    if split not in meta["splits"]:
        raise ShardSetError(f"{join(shard_dir, META_NAME)}: no split {split!r}; it has {sorted(meta['splits'])}")
    return [join(shard_dir, name) for name in meta["splits"][split]["shards"]]


def image_key(sample: dict) -> str:
    """The sample's image field (``jpg``/``jpeg``/``png``/``webp``); KeyError naming the sample otherwise."""
    for key in IMAGE_KEYS:
        if key in sample:
            return key
    raise KeyError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: no image ({'/'.join(IMAGE_KEYS)})")


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes to an RGB PIL image (raises on corrupt or truncated data)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_label(sample: dict, num_classes: int | None = None) -> int:
    """The integer label of a raw sample's ``cls`` field; ValueError when absent or out of range."""
    if "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: no .cls label")
    label = int(bytes(sample["cls"]).decode().strip())
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"sample {sample.get('__key__')}: label {label} out of range 0..{num_classes - 1}")
    return label


def read_tar_samples(
    url: str, handler=wds.reraise_exception, remote: RemoteOptions = DEFAULT_OPTIONS
) -> Iterator[dict]:
    """Raw samples (``{"__key__", "jpg", "cls", ...}`` with undecoded bytes) of one tar file, in order.

    ``url``: a local path or URL, opened by :func:`remote.open_url` (remote reads resume after dropped connections).
    A shard that cannot be opened, or whose read fails after the retries, goes to ``handler`` once as a
    :class:`ShardUnavailable` (the samples already yielded stay yielded); a bad member goes to it as itself.
    """
    try:
        stream = open_url(url, remote)
    except ShardUnavailable as exn:
        handler(exn)  # counted, or raised
        return

    def members_handler(exn: BaseException) -> bool:
        if isinstance(exn, ShardUnavailable):
            raise exn  # the stream gave up: report the shard once, below
        return handler(exn)

    with stream:
        files = tar_file_samples(stream, url, members_handler)  # webdataset's tar_file_expander, faster
        try:
            yield from wds.tariterators.group_by_keys(files, handler=handler)
        except ShardUnavailable as exn:
            handler(exn)


# ---------------------------------------------------------------------------------------------- writing
def parse_shard_size(text: str | int) -> tuple[int, float]:
    """``"1000"`` -> (1000 samples, no byte limit); ``"256MB"`` -> (no count limit, 256e6 bytes)."""
    value = str(text).strip()
    if value.isdigit():
        if int(value) < 1:
            raise ValueError(f"--shard-size {text}: must be at least 1 sample")
        return int(value), 3e9
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?)", value, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--shard-size {text!r}: give samples per shard (1000) or a size (256MB, 1GB, 512KiB)")
    unit = match.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    size = float(match.group(1)) * base ** ("KMGT".index(unit[0]) + 1)
    if size < 1024:
        raise ValueError(f"--shard-size {text}: too small")
    return 10**12, size


@dataclass
class SplitStats:
    """What one split's writer saw: shard names, samples per shard, labels."""

    shards: list[str] = field(default_factory=list)
    shard_sizes: list[int] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)


class ShardSetWriter:
    """Writes the splits of a shard set into ``NAME.partial-<host>-<pid>/`` and publishes it atomically.

    Use as a context manager: on an exception the partial folder is removed; :meth:`commit` writes
    meta.json last and renames the folder to ``NAME`` (replacing an older copy only with ``overwrite``).
    """

    def __init__(self, output: str | Path, *, maxcount: int, maxsize: float, overwrite: bool = False):
        self.output = Path(output)
        self.partial = self.output.parent / f"{self.output.name}.partial-{_host()}-{os.getpid()}"
        self.maxcount, self.maxsize, self.overwrite = maxcount, maxsize, overwrite
        self.stats: dict[str, SplitStats] = {}
        self._writer: wds.ShardWriter | None = None
        self._split: str | None = None

    def __enter__(self) -> ShardSetWriter:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close_split()
        if self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)

    def start_split(self, split: str) -> None:
        """Open ``split-000000.tar``; later shards follow when the count or size limit is reached."""
        self._close_split()
        self._split = split
        self.stats[split] = SplitStats()
        pattern = str(self.partial / f"{split}-%06d.tar")
        # mtime fixed: the same input gives byte-identical shards.
        self._writer = wds.ShardWriter(pattern, maxcount=self.maxcount, maxsize=self.maxsize, verbose=0, mtime=0.0)

    def write(self, key: str, image: bytes, ext: str, label: int, info: dict[str, Any]) -> None:
        """Add one sample: raw encoded ``image`` bytes as ``KEY.ext``, ``KEY.cls``, ``KEY.json``."""
        assert self._writer is not None and self._split is not None, "start_split() first"
        if "." in key:
            raise ValueError(f"sample key {key!r}: must not contain dots (WebDataset splits the extension there)")
        sample = {"__key__": key, ext: image, "cls": str(label).encode(), "json": json.dumps(info).encode()}
        self._writer.write(sample)
        stats = self.stats[self._split]
        name = Path(self._writer.fname).name
        if not stats.shards or stats.shards[-1] != name:
            stats.shards.append(name)
            stats.shard_sizes.append(0)
        stats.shard_sizes[-1] += 1
        stats.labels[label] += 1

    def _close_split(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            stats = self.stats[self._split]
            # ShardWriter opens its first tar eagerly: drop it when the split got no sample at all.
            if not stats.shards:
                for tar in self.partial.glob(f"{self._split}-*.tar"):
                    tar.unlink()

    def record_files(self, meta: dict) -> None:
        """Add each shard file's size and sha256 to ``meta``'s splits (``shard_bytes``, ``shard_sha256``): what a
        reader's cache checks its copies against."""
        self._close_split()
        for info in meta["splits"].values():
            files = [self.partial / name for name in info["shards"]]
            info["shard_bytes"] = [f.stat().st_size for f in files]
            info["shard_sha256"] = [file_sha256(f) for f in files]

    def commit(self, meta: dict) -> Path:
        """Write meta.json (last) and move the finished folder to ``output``; returns ``output``."""
        self._close_split()
        with open(self.partial / META_NAME, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        old = None
        if self.output.exists():
            if not self.overwrite and _visible_entries(self.output):
                raise ShardSetError(f"{self.output}: appeared while writing; pass --overwrite to replace it")
            old = self.output.parent / f"{self.output.name}.old-{os.getpid()}"
            os.rename(self.output, old)
        os.rename(self.partial, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output


def check_output(output: str | Path, identity: dict, overwrite: bool) -> None:
    """Refuse to write over another data set; writing over the same one needs ``overwrite``.

    ``identity`` (``{"source": kind, "input": path}``) is compared with the ``source`` / ``source_args.input``
    of the meta.json already there (other options may change in a rebuild). Stale ``NAME.partial-<host>-<pid>``
    folders of dead runs on this host are removed.
    """
    output = Path(output)
    _remove_stale_partials(output)
    if not output.exists():
        return
    if not output.is_dir():
        raise ShardSetError(f"--output {output}: exists and is not a folder; choose another --output")
    entries = _visible_entries(output)
    if not entries:
        return
    meta_path = output / META_NAME
    if not meta_path.is_file():
        raise ShardSetError(
            f"--output {output}: holds {len(entries)} files but no meta.json, so it is not a shard set; "
            "choose another --output or empty that folder"
        )
    with open(meta_path, encoding="utf-8") as f:
        old = json.load(f)
    old_identity = {"source": old.get("source"), "input": (old.get("source_args") or {}).get("input")}
    if old_identity != identity:
        raise ShardSetError(
            f"--output {output}: holds another data set (source {old_identity['source']}, input "
            f"{old_identity['input']}); choose another --output, or delete that folder if you mean to replace it"
        )
    if not overwrite:
        raise ShardSetError(
            f"--output {output}: already holds this data set (made {old.get('created', '?')}); "
            "pass --overwrite to rebuild it, or --verify it"
        )


def upload_shard_set(local: str | Path, url: str, *, overwrite: bool = False, progress: bool = True) -> None:
    """Copy the finished shard set at ``local`` to ``url``: every tar file first, meta.json last, so a reader
    never sees a set whose meta.json lists files not there yet.

    ``url``: an fsspec location (``s3://``, ``gs://`` ...) or a ``pipe:`` command with ``{}`` for the file name
    that reads the file on stdin. An fsspec location that already holds a meta.json is refused unless
    ``overwrite``; then that meta.json is deleted first, so readers see no set (not a mixed one) meanwhile.
    """
    from tqdm import tqdm

    local = Path(local)
    meta = load_meta(local)
    meta_url = join(url, META_NAME)
    if remote_exists(meta_url):
        if not overwrite:
            raise ShardSetError(f"--output {url}: already holds a shard set (meta.json); pass --overwrite to replace "
                                "it, or --verify it")  # fmt: skip
        remove_remote(meta_url)
    names = [name for split in meta["splits"].values() for name in split["shards"]]
    for name in tqdm(names, desc="upload", unit="shard", disable=not progress):
        upload_file(local / name, join(url, name))
    upload_file(local / META_NAME, meta_url)


def _visible_entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _remove_stale_partials(output: Path) -> None:
    """Remove ``NAME.partial-<host>-<pid>`` folders left by dead runs on this host (others may be alive)."""
    if not output.parent.is_dir():
        return
    prefix = f"{output.name}.partial-{_host()}-"
    for partial in output.parent.glob(f"{output.name}.partial-*"):
        pid = partial.name[len(prefix) :]
        if partial.name.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- verifying
@dataclass
class ShardCheck:
    """What re-reading one tar file found."""

    path: str
    num_samples: int = 0
    labels: Counter = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_shard(path: str, num_classes: int) -> ShardCheck:
    """Re-read one tar (local or URL): every sample must have a label in range and a fully decodable image."""
    result = ShardCheck(path)
    try:
        for sample in read_tar_samples(path):
            result.num_samples += 1
            result.keys.append(sample["__key__"])
            try:
                result.labels[decode_label(sample, num_classes)] += 1
                decode_image(sample[image_key(sample)])
            except Exception as exn:  # any failure of a sample is a finding, not a crash
                result.problems.append(f"{path}: sample {sample['__key__']}: {exn}")
    except ShardMissing:
        result.problems.append(f"{path}: listed in meta.json but missing")
    except Exception as exn:  # an unreadable tar is a finding
        result.problems.append(f"{path}: unreadable after {result.num_samples} samples: {exn}")
    return result


def _check_shard_star(args: tuple[str, int]) -> ShardCheck:
    return check_shard(*args)


def verify_shards(shard_dir: str | Path, *, workers: int = 1, progress: bool = True) -> tuple[bool, list[str]]:
    """Re-read a shard set and compare it with its meta.json: per-shard and per-class counts, decodability.

    Returns ``(ok, report lines)``; the lines start with a summary and list every problem found.
    """
    from multiprocessing import Pool

    from tqdm import tqdm

    meta = load_meta(shard_dir)
    problems: list[str] = []
    summary: list[str] = []
    jobs = [(join(shard_dir, name), meta["num_classes"]) for s in meta["splits"].values() for name in s["shards"]]
    bar = tqdm(total=len(jobs), desc="verify", unit="shard", disable=not progress)
    if workers > 1:
        with Pool(workers) as pool:
            results = _collect(pool.imap(_check_shard_star, jobs), bar)
    else:
        results = _collect(map(_check_shard_star, jobs), bar)
    bar.close()
    by_path = {r.path: r for r in results}
    for split, info in meta["splits"].items():
        checks = [by_path[join(shard_dir, name)] for name in info["shards"]]
        problems += _compare_split(split, info, checks, meta["num_classes"])
        summary.append(f"  {split}: {sum(c.num_samples for c in checks)} samples in {len(checks)} shards")
    if "train" in meta["splits"] and meta["class_counts"] != meta["splits"]["train"]["class_counts"]:
        problems.append("meta.json: class_counts differs from splits.train.class_counts")
    listed = {name for s in meta["splits"].values() for name in s["shards"]}
    present = list_remote(str(shard_dir), "*.tar") if is_url(shard_dir) else [
        p.name for p in local_path(shard_dir).glob("*.tar")]  # fmt: skip
    extra = sorted(name for name in present or [] if name not in listed)
    if extra:
        problems.append(f"{shard_dir}: tar files not listed in meta.json: {extra[:5]}")
    status = "OK" if not problems else f"FAILED ({len(problems)} problems)"
    head = f"{shard_dir}: {status}; {meta['num_classes']} classes"
    return not problems, [head, *summary, *(f"  problem: {p}" for p in problems)]


def _collect(results, bar) -> list[ShardCheck]:
    out = []
    for r in results:
        out.append(r)
        bar.update(1)
    return out


def _compare_split(split: str, info: dict, checks: list[ShardCheck], num_classes: int) -> list[str]:
    problems = [p for c in checks for p in c.problems]
    for check, expected in zip(checks, info["shard_sizes"]):
        if check.num_samples != expected:
            problems.append(f"{check.path}: {check.num_samples} samples, meta.json says {expected}")
    total = sum(c.num_samples for c in checks)
    if total != info["num_samples"]:
        problems.append(f"{split}: {total} samples, meta.json says {info['num_samples']}")
    labels = sum((c.labels for c in checks), Counter())
    counts = [labels.get(i, 0) for i in range(num_classes)]
    if counts != info["class_counts"]:
        diff = [i for i in range(num_classes) if counts[i] != info["class_counts"][i]]
        problems.append(
            f"{split}: class counts differ from meta.json for classes {diff[:10]} "
            f"(found {[counts[i] for i in diff[:10]]}, expected {[info['class_counts'][i] for i in diff[:10]]})"
        )
    keys = Counter(k for c in checks for k in c.keys)
    dupes = [k for k, n in keys.items() if n > 1]
    if dupes:
        problems.append(f"{split}: duplicate keys {dupes[:5]}")
    return problems


def train_class_counts(meta: dict, split: str) -> list[int]:
    """Training images per class of ``split`` (``data.train_split``): the prior of the balanced losses, the shot
    groups and the test priors."""
    info = meta.get("splits", {}).get(split)
    if info is not None and "class_counts" in info:
        return [int(c) for c in info["class_counts"]]
    if split == "train":
        return [int(c) for c in meta["class_counts"]]
    raise ConfigError(f"data.train_split={split!r}: the shard set's meta.json has no class counts for it; "
                      f"its splits are {sorted(meta.get('splits', {}))}")
