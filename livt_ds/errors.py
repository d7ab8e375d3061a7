"""Every exception livt raises on purpose, in one place: the library raises them, the CLI turns them into one line
and an exit code (cli.py). Each message says what was wrong, where, and what to do."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or DeepSpeed config that cannot be used as written."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


class StateError(CheckpointError):
    """A saved training state this version cannot read."""


class UnsafeWeightsError(CheckpointError):
    """A weights file that would need arbitrary Python objects (and so could run code) to load."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops without writing a checkpoint."""


class RunLockedError(RuntimeError):
    """Another live process writes to this run folder."""


class SourceError(ValueError):
    """The raw data cannot be read as asked; the message says where and what to do."""


class ShardSetError(RuntimeError):
    """A shard set folder is missing, incomplete or belongs to another data set; the message says what to do."""


class ShardUnavailable(OSError):
    """A file of a shard set could not be read, after the retries where retrying makes sense."""


class ShardMissing(ShardUnavailable, FileNotFoundError):
    """A file of a shard set does not exist (HTTP 404/410, no such object or file)."""
