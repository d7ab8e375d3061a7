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


class ReadGaveUp(ShardUnavailable):
    """A read that still failed after its ``retries`` (refused or dropped connections, timeouts, HTTP 5xx)."""


class ShardCutShort(ShardUnavailable):
    """A shard read that ended before the last sample meta.json lists: a truncated, overwritten or damaged file.
    (A tar cut at a member boundary, or zero-filled, reads as a shorter valid tar: only the count tells.)"""


class CachedCopyMismatch(ShardUnavailable):
    """A downloaded shard is not the file its set's meta.json describes (another size or sha256)."""


class DataSourceOutage(OSError):
    """Reads of several shards in a row gave up after their retries: the source of the shard set, not one file, is
    failing. The trainer saves a checkpoint and stops (engine.py); the message names the URL and the cause."""

    def __str__(self) -> str:
        text = super().__str__()
        if "Original Traceback" in text:  # re-raised by a DataLoader from its worker: the worker's own message
            text = text.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        return text


class IncompleteEvaluationError(ShardSetError):
    """An evaluation scored fewer samples than its split holds (a shard cut short, damaged or unreadable)."""


class NothingPredictedError(ValueError):
    """Every input was unreadable: the output holds error lines only."""
