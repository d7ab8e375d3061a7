"""Loading weights files without running code from them.

A ``.pt`` file is a pickle: unpickling it can call any Python function the file names (``os.system`` ...).
Everything livt reads for ``model.init``, ``livt eval`` and ``livt predict`` therefore goes through
``torch.load(weights_only=True)``, which only rebuilds tensors, plain containers and an explicit allow-list of
classes, or through safetensors (no code at all). DeepSpeed checkpoints hold a few non-tensor objects (the
optimizer's ZeRO stage enum, numpy RNG states in our client state, ...): those classes are allow-listed here, and
DeepSpeed's own loaders, which call ``torch.load(weights_only=False)``, run inside :func:`weights_only_loading`,
which forces ``weights_only=True`` for every ``torch.load`` in this process.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from livt_ds.errors import UnsafeWeightsError

__all__ = ["allowed_globals", "load_torch_file", "weights_only_loading"]


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


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the allow-list; a clear UnsafeWeightsError otherwise."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None


@contextlib.contextmanager
def weights_only_loading(where: str | Path) -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's included) loads with ``weights_only=True`` and the allow-list.

    ``torch.load`` is wrapped for the duration (in this process only: PyTorch's TORCH_FORCE_WEIGHTS_ONLY_LOAD would
    also reach subprocesses, such as DeepSpeed's universal-checkpoint converter, without the allow-list). An
    UnpicklingError raised inside, directly or as the cause of a wrapping error, becomes UnsafeWeightsError naming
    ``where``. Not thread-safe.
    """
    original = torch.load

    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = torch.serialization.load = load
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    except Exception as exc:
        cause = exc if isinstance(exc, pickle.UnpicklingError) else exc.__cause__ or exc.__context__
        if isinstance(cause, pickle.UnpicklingError):
            raise _refusal(where, cause) from None
        raise
    finally:
        torch.load = torch.serialization.load = original
