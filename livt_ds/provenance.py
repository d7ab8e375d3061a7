"""Keeping a run folder true to what was trained: recipe changes on resume, the run's history, one writer.

- `check_resume_recipe`: a resumed run may change the operational keys (`OPERATIONAL_KEYS`: remote reads, workers,
  the spelling or copy of the data path, eval / log / checkpoint settings, where to stop), never what is trained,
  unless the user says so (``--allow-recipe-change``).
- `History`: ``RUN/history.jsonl``, one ``start`` record per launch (command, world, hosts, start step, recipe and
  its diff against the previous segment, versions, git commit) and one ``end`` record (end step, reason).
- `RunLock`: ``RUN/run.lock`` held by global rank 0 while a run is alive; stale once its process is gone (same
  host) or its heartbeat stops (another host on a shared filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from livt_ds.config import ConfigError, Recipe, merge_trees, recipe_to_dict

# The recipe keys a resumed run may change: they say how a run is operated, not what it trains (a key ending in
# ".*" stands for its whole section). Every other key defines training: a resume that changes it is refused unless
# --allow-recipe-change. The README lists both kinds from this table.
OPERATIONAL_KEYS: dict[str, str] = {
    "data.path": "another spelling of the same shard set, or another copy of it (a URL for a local folder, another "
                 "server): the same meta.json. Another set defines training",
    "data.num_workers": "decode processes per rank (the batches after the resume then differ from those of an "
                        "uninterrupted run, which the resume says)",
    "data.retries": "further tries of a remote read",
    "data.retry_backoff_s": "the wait before a retry",
    "data.timeout_s": "the timeout of one remote request",
    "data.cache_dir": "where remote shards are cached",
    "data.cache_max_gb": "the size bound of that cache",
    "train.stop_after_steps": "where this launch stops (the schedule is unchanged)",
    "data.test_split": "the split evaluated once after training (read after training, never during it)",
    "eval.*": "when, with what batch and under which test priors the model is evaluated",
    "log.*": "how often and where the run logs",
    "checkpoint.*": "how often the run saves and how many checkpoints it keeps",
}
PACKAGES = ("livt-ds", "torch", "deepspeed", "timm", "webdataset")


class RunLockedError(RuntimeError):
    """Another live process writes to this run folder."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 2}} -> {"train.epochs": 2}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Dotted key -> [old value, new value] for every key whose value differs (a missing key reads as None)."""
    a, b = flatten(old), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_operational(key: str) -> bool:
    """Whether ``key`` is in OPERATIONAL_KEYS (``data.path`` only when it names the same set: see `split_changes`)."""
    return key in OPERATIONAL_KEYS or any(k.endswith(".*") and key.startswith(k[:-1]) for k in OPERATIONAL_KEYS)


def same_shard_set(old_path: Any, new_path: Any, old_sha256: str | None, new_sha256: str | None) -> bool:
    """Whether two ``data.path`` values name the same shard set: the same meta.json (its sha256, when both are
    known), else the same location spelled differently (a trailing ``/``, relative or absolute, ``file://``)."""
    if old_sha256 and new_sha256:
        return old_sha256 == new_sha256
    spelled = [_location(p) for p in (old_path, new_path)]
    return spelled[0] == spelled[1]


def _location(path: Any) -> str:
    text = str(path or "")
    if text.startswith("pipe:") or ("://" in text and not text.startswith("file://")):
        return text.rstrip("/")
    return str(Path(text.removeprefix("file://")).resolve())


def split_changes(diff: dict[str, list[Any]], same_data: bool) -> dict[str, dict[str, list[Any]]]:
    """``{"operational": ..., "training": ...}``: the keys of a recipe diff, each with its [before, after]."""
    out: dict[str, dict[str, list[Any]]] = {"operational": {}, "training": {}}
    for key, values in diff.items():
        operational = is_operational(key) and (key != "data.path" or same_data)
        out["operational" if operational else "training"][key] = values
    return out


def check_resume_recipe(old: dict[str, Any], new: dict[str, Any], *, allow: bool, checkpoint: str,
                        output: str, data_sha256: tuple[str | None, str | None] = (None, None)
                        ) -> dict[str, list[Any]]:
    """The recipe diff between a checkpoint's recipe and the resumed run's; raises ConfigError when a key that
    defines training differs and ``allow`` is False. Operational changes (OPERATIONAL_KEYS) always pass; keys newer
    than the checkpoint's recipe read as their defaults there.
    ``data_sha256``: the meta.json digests of the checkpoint's shard set and of this run's (see `same_shard_set`)."""
    diff = recipe_diff(merge_trees(recipe_to_dict(Recipe()), old), new)
    same_data = same_shard_set(old.get("data", {}).get("path"), new.get("data", {}).get("path"), *data_sha256)
    training = split_changes(diff, same_data)["training"]
    if training and not allow:
        lines = "\n".join(f"  {k}: {v[0]!r} -> {v[1]!r}" for k, v in training.items())
        raise ConfigError(
            f"{checkpoint} was trained with another recipe; resuming would change what is trained:\n{lines}\n"
            f"Start a new run with another --output, or pass --allow-recipe-change to continue {output} with the new "
            "values on purpose (recorded in history.jsonl; with another train.epochs the lr follows, from the resume "
            "step on, the schedule of a run planned with the new length).")
    return diff


def recipe_digest(recipe: dict[str, Any]) -> str:
    """sha256 of the recipe's canonical JSON: names the exact recipe a model was trained with."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The commit of the livt-ds checkout being run (with ``-dirty`` for local changes), None outside git."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


class History:
    """``RUN/history.jsonl``: append-only; written by rank 0 only."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "history.jsonl"

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def last_recipe(self) -> dict[str, Any] | None:
        start = self._last_start()
        return start["recipe"] if start else None

    def _last_start(self) -> dict[str, Any] | None:
        starts = [r for r in self.records() if r.get("event") == "start"]
        return starts[-1] if starts else None

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def start(self, *, stage: str, recipe: dict[str, Any], start_step: int, world_size: int, hosts: list[str],
              resumed_from: str | None, diff: dict[str, list[Any]] | None, schedule: dict[str, Any],
              data_sha256: str | None = None) -> int:
        """Append a segment's start record; returns the segment number (0 for a new run). ``recipe_diff`` is taken
        against the previous segment's recipe, else ``diff`` (against the checkpoint resumed from, if any); ``changes``
        sorts it into operational and training keys, each with its [before, after]. ``data_sha256``: the digest of
        the shard set's meta.json (it tells a copy of the set from another set)."""
        previous = self._last_start()
        if previous is not None:
            diff = recipe_diff(previous["recipe"], recipe)
        old_path = (previous or {}).get("recipe", {}).get("data", {}).get("path")
        same_data = same_shard_set(old_path, recipe.get("data", {}).get("path"),
                                   (previous or {}).get("data_sha256"), data_sha256)
        segment = sum(1 for r in self.records() if r.get("event") == "start")
        self._append({"event": "start", "segment": segment, "time": _now(), "stage": stage,
                      "command": [sys.executable, *sys.argv], "cwd": os.getcwd(), "world_size": world_size,
                      "hosts": hosts, "start_step": start_step, "resumed_from": resumed_from,
                      "recipe_diff": diff or {}, "changes": split_changes(diff or {}, same_data),
                      "data_sha256": data_sha256, "recipe": recipe, "recipe_sha256": recipe_digest(recipe),
                      "schedule": schedule, "versions": versions(), "git_commit": git_commit()})
        return segment

    def end(self, segment: int, *, end_step: int, reason: str) -> None:
        self._append({"event": "end", "segment": segment, "time": _now(), "end_step": end_step, "reason": reason})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def pid_alive(pid: int) -> bool:
    """True while a process with this id runs on this host (also one owned by another user).

    A zombie is dead: a killed rank whose parent died with it stays one until something reaps it, forever in a
    container whose first process does not reap orphans, and it must not keep holding the run folder's lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs (macOS): kill(0) is all we know
    return state not in ("Z", "X")


class RunLock:
    """An exclusive lock file in a run folder, held by one process (global rank 0).

    Created atomically (a complete temporary file hard-linked to ``run.lock``, which fails if the name exists, also
    on NFS); a stale lock is removed under an exclusive ``flock`` by one launcher at a time (`_remove_if_stale`);
    refreshed by a heartbeat thread every ``heartbeat_s`` seconds. A lock is stale when its holder runs on
    this host and its process is gone, or when its heartbeat is older than ``stale_after_s`` (another host).
    """

    def __init__(self, run_dir: Path, *, heartbeat_s: float = 30.0, stale_after_s: float = 180.0) -> None:
        self.path = Path(run_dir) / "run.lock"
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                      "command": [sys.executable, *sys.argv]}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: judged by its age alone

    def is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == self.owner["host"] and isinstance(holder.get("pid"), int):
            return not pid_alive(holder["pid"])
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after_s

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{self.owner['host']}.{self.owner['pid']}")
        tmp.write_text(json.dumps(self.owner))
        try:
            for _ in range(20):
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    holder = self.holder()
                    if holder is None:
                        continue
                    if not self.is_stale(holder):
                        raise RunLockedError(self._held_message(holder)) from None
                    self._remove_if_stale(holder)
            else:
                raise RunLockedError(f"{self.path}: could not take the lock (it keeps changing hands)")
        finally:
            tmp.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._beat, name="livt-run-lock", daemon=True)
        self._thread.start()
        return self

    def _remove_if_stale(self, judged: dict[str, Any]) -> None:
        """Remove the lock judged stale, unless it changed hands meanwhile. Launchers taking over one lock do it one
        at a time (``flock`` on a sibling file), and each looks again under it: without that, one could remove the
        lock another had just taken over, and both would hold the folder."""
        with _exclusive(self.path.with_name(f".{self.path.name}.takeover")):
            holder = self.holder()
            if holder == judged and holder is not None and self.is_stale(holder):
                self.path.unlink(missing_ok=True)

    def _held_message(self, holder: dict[str, Any]) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder
               else "an unreadable lock")
        return (f"{self.path.parent} is in use by another run ({who}; command: "
                f"{' '.join(holder.get('command', [])[1:]) if holder else '?'}). Wait for it to end or use another "
                f"--output. A lock whose process is gone is taken over automatically (on another host: after "
                f"{self.stale_after_s:.0f} s without a heartbeat); {self.path} may also be removed by hand.")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.holder()
        if holder and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)


# What a training launch writes into its run folder: `discard_run_outputs` deletes these for --overwrite.
RUN_OUTPUTS = ("checkpoints", "export", "evals", "tensorboard", "plots", "metrics.jsonl", "metrics.json",
               "best_metrics.json", "status.json", "config.yaml", "ds_config.json", "run.yaml")


def discard_run_outputs(run_dir: Path) -> list[str]:
    """Delete an earlier run's outputs from ``run_dir`` (``--resume none --overwrite``); history.jsonl stays, so
    the folder still tells what was trained there before. Returns the names deleted."""
    import shutil

    deleted = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        deleted.append(name)
    return deleted


def refuse_change_that_trains_nothing(old: dict[str, Any], new: dict[str, Any], diff: dict[str, list[Any]],
                                      data_sha256: tuple[str | None, str | None], step: int, end: int,
                                      checkpoint: str) -> None:
    """A resume that changes what is trained but trains no step would only relabel the checkpoint's weights (its
    exports and evaluations follow the checkpoint's own recipe, never the new one): refused. ``old`` / ``new`` /
    ``diff`` / ``data_sha256`` as `check_resume_recipe` had them."""
    same_data = same_shard_set(old.get("data", {}).get("path"), new.get("data", {}).get("path"), *data_sha256)
    training = list(split_changes(diff, same_data)["training"])
    if training and step >= end:
        raise ConfigError(f"{checkpoint} is at step {step} and this launch ends at step {end}: it would train "
                          f"nothing, so the recipe change ({', '.join(training)}) would describe no weights. "
                          "Raise train.epochs (or train.stop_after_steps) to train under the new recipe, or start "
                          "a new run with another --output.")


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the block. Where the filesystem has no flock
    (some cluster filesystems mount without it) the block runs unlocked, as before flock was used."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def model_provenance(run_dir: Path | None, tag: str | None, recipe: dict[str, Any] | None) -> dict[str, Any]:
    """What a metrics.json or an export records about the weights it came from."""
    return {"run": str(Path(run_dir).resolve()) if run_dir else None, "checkpoint_tag": tag,
            "recipe_sha256": recipe_digest(recipe) if recipe is not None else None}
