"""Feeding every rank's optimizer steps together, so that a data source outage stops all ranks at one step.

A rank whose loader fails in the middle of a step cannot leave the step's collectives (the gradient reductions in
backward): the other ranks would wait in them, and it could not save a checkpoint, itself a collective. So each rank
reads all the micro-batches of its next optimizer step before it trains on any of them, and the ranks then agree
(one small CPU collective per step) that every one could. When one could not (:class:`DataSourceOutage`), every
rank raises it at that step boundary, where the trainer saves the last completed step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from livt_ds import dist
from livt_ds.data.remote import DataSourceOutage


def step_batches(loader: Iterable, accumulation: int) -> Iterator[Any]:
    """The loader's micro-batches, in order, read ``accumulation`` at a time (one optimizer step's worth); raises
    :class:`DataSourceOutage` on every rank, before the step, when any rank's source is unavailable."""
    batches = iter(loader)
    while True:
        step, outage = [], None
        try:
            for _ in range(accumulation):
                step.append(next(batches))
        except StopIteration:
            pass
        except DataSourceOutage as exc:
            outage = str(exc)
        if dist.any_rank(outage is not None):
            raise DataSourceOutage(next(m for m in dist.gather_objects(outage) if m))
        if not step:
            return
        yield from step
