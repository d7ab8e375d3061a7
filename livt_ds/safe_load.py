"""Loading weights files without running code from them.

A ``.pt`` file is a pickle: unpickling it can call any Python function the file names (``os.system`` ...).
Everything livt reads (``model.init``, ``livt eval``, ``livt predict``, export, resume) therefore goes through
``torch.load(weights_only=True)``, which only rebuilds tensors, plain containers and an explicit allow-list of
classes, or through safetensors (no code at all). DeepSpeed checkpoints hold a few non-tensor objects (the
optimizer's ZeRO stage enum, numpy RNG states in our client state, ...): those classes are allow-listed here.
DeepSpeed's own loaders, which call ``torch.load(weights_only=False)``, run inside :func:`weights_only_loading`
(in this process) or after :func:`install_weights_only_loading` (the universal conversion's process,
livt_ds/universal.py): every ``torch.load`` then loads weights-only with the allow-list, and a file that needs
anything else is refused, naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from livt_ds.checkpoint import CheckpointError

__all__ = ["UnsafeWeightsError", "allowed_globals", "install_weights_only_loading", "load_torch_file",
           "weights_only_loading"]


class UnsafeWeightsError(CheckpointError):
    """A weights file that would need arbitrary Python objects (and so could run code) to load."""


def allowed_globals() -> list[Any]:
    """Classes and functions our own checkpoints need besides tensors and containers (all data, no side effects)."""
    import numpy as np

    allowed: list[Any] = [np.dtype, np.ndarray, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]
    try:  # numpy >= 1.25 / 2.x spell the array reconstructor differently
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core.multiarray import _reconstruct
    allowed.append(_reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    except ImportError:  # pragma: no cover - deepspeed is a dependency; exports load without it
        pass
    return allowed


def _refusal(where: str | Path, exc: BaseException) -> UnsafeWeightsError:
    detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line),
                  str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return UnsafeWeightsError(
        f"{where}: refused to load: the file holds Python objects other than tensors and plain data ({detail}); "
        "unpickling it could run arbitrary code. Use a livt export (model.safetensors + config.json from "
        "`livt export RUN`) or a checkpoint written by livt; if you trust this file, convert it to safetensors "
        "yourself.")


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` with the allow-list; a clear UnsafeWeightsError otherwise."""
    _allow()
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None


@functools.cache
def _allow() -> None:
    """Register the allow-list with torch for this process, once. (Process-wide rather than torch's
    ``safe_globals`` context: those contexts do not nest, the inner one's exit removes the outer one's entries.)"""
    torch.serialization.add_safe_globals(allowed_globals())


def _file_name(f: Any) -> str:
    """What a ``torch.load`` argument names: a path, or an open file's name."""
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, "name", "a weights file"))


def _weights_only(load: Any) -> Any:
    """``load`` (torch.load) with ``weights_only=True`` forced; a refused file raises UnsafeWeightsError naming it."""
    if getattr(load, "livt_weights_only", False):
        return load

    @functools.wraps(load)
    def weights_only_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return load(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise _refusal(_file_name(f), exc) from None

    weights_only_load.livt_weights_only = True
    return weights_only_load


def install_weights_only_loading() -> None:
    """For the rest of this process, every ``torch.load`` loads weights-only with the allow-list (for a process
    that runs a third-party converter and nothing else: livt_ds/universal.py)."""
    _allow()
    torch.load = torch.serialization.load = _weights_only(torch.load)


@contextlib.contextmanager
def weights_only_loading(where: str | Path) -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's included) loads with ``weights_only=True`` and the allow-list.

    ``torch.load`` is wrapped for the duration (in this process only; the universal conversion runs in a process
    of its own, which installs the same loader first: livt_ds/universal.py). A refused file raises
    UnsafeWeightsError naming it; an UnpicklingError that reaches here otherwise (as the cause of a wrapping error)
    becomes one naming ``where``. Not thread-safe.
    """
    _allow()
    original = torch.load
    torch.load = torch.serialization.load = _weights_only(original)
    try:
        yield
    except UnsafeWeightsError:
        raise
    except Exception as exc:
        cause = exc if isinstance(exc, pickle.UnpicklingError) else exc.__cause__ or exc.__context__
        if isinstance(cause, UnsafeWeightsError):
            raise cause from None
        if isinstance(cause, pickle.UnpicklingError):
            raise _refusal(where, cause) from None
        raise
    finally:
        torch.load = torch.serialization.load = original
