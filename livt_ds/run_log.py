"""What a run tells people: ``metrics.jsonl``, TensorBoard scalars and images, a progress bar, messages.

Rank 0 only; on other ranks every method does nothing, so callers never branch on the rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from livt_ds import dist
from livt_ds.run_files import METRICS_LOG, TENSORBOARD


class Logger:
    def __init__(self, output: Path, *, tensorboard: bool, progress: bool, total_steps: int = 0,
                 start_step: int = 0) -> None:
        self.enabled = dist.is_main()
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output / METRICS_LOG, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / TENSORBOARD))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One metrics.jsonl record; the finite numbers also to TensorBoard (lists / dicts: jsonl only)."""
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}{k}": v for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}{key}", value, step)
        if self.bar is not None and "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")

    def images(self, step: int, images: dict[str, torch.Tensor], prefix: str = "eval/") -> None:
        if self.enabled and self.writer is not None:
            for name, image in images.items():
                self.writer.add_image(f"{prefix}{name}", image, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(f"[livt] {text}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()
