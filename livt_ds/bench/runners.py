"""One model + optimizer whose ``step(images, labels)`` runs a whole training step, on one of the benchmark's paths.

- ``project``: what the trainer does (``livt_ds.engine``): the task's model, ``optim.param_groups``,
  ``deepspeed.initialize`` with the resolved DeepSpeed config; a step = ``apply_lr`` + ``train_micro_step`` (host
  batch to the device, ``task.prepare_batch`` (mixup / cutmix) on the device, cast to the engine's dtype, forward,
  loss, ``engine.backward``, ``engine.step``).
- ``baseline``: the same model, parameter groups, learning rate and loss in a plain eager loop, in one of
  ``EAGER_VARIANTS``: ``amp-fused`` (fp32 weights, bf16 autocast on CUDA, fused AdamW on CUDA) or ``pure-foreach``
  (the weights in the engine's dtype, foreach AdamW: the engine's arithmetic without the engine).
- ``compile``: the engine's ``DeepSpeedEngine.compile()`` (``nn.Module.compile`` of the wrapped module, in place)
  and ``model.compile()`` on the eager loop, so the ratio stays like for like.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from livt_ds.bench.settings import ADAM_VARIANTS, EAGER_VARIANTS, REPO, Settings
from livt_ds.config import ConfigError, Recipe, load_ds_config, resolve_ds_config
from livt_ds.engine import build_engine, train_micro_step
from livt_ds.optim import apply_lr, param_groups
from livt_ds.seeding import seed_everything
from livt_ds.tasks import Task


class Runner:
    """One model + optimizer; ``step(images, labels) -> loss`` runs a whole training step; ``close`` frees it."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                 info: dict[str, Any], owned: list[Any]) -> None:
        self.step, self.device, self.info, self.owned = step, device, info, owned

    def close(self) -> None:
        for obj in self.owned:
            if hasattr(obj, "destroy"):
                with contextlib.suppress(Exception):
                    obj.destroy()
        self.owned.clear()
        self.step = None  # the closure holds the model and optimizer


def relative(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def set_adam(ds: dict[str, Any], variant: str) -> dict[str, Any]:
    """Switch a resolved DeepSpeed config's AdamW implementation (one of ADAM_VARIANTS); returns ``ds``."""
    params = ds["optimizer"]["params"]
    if variant == "torch-fused":
        params.update(torch_adam=True, fused=True)
    elif variant == "deepspeed-fused":
        params.pop("torch_adam", None)
        params.pop("fused", None)
    elif variant != "config":
        raise ConfigError(f"ds_adam {variant!r}: use one of {', '.join(ADAM_VARIANTS)}")
    return ds


def engine_dtype(ds: dict[str, Any]) -> torch.dtype:
    """The dtype a DeepSpeed config trains in (bf16 / fp16 when enabled, else fp32)."""
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32


def project_runner(recipe: Recipe, task: Task, ds_path: Path, *, compile_model: bool, adam: str = "config") -> Runner:
    """The trainer's engine and micro-step for one task (one optimizer step per micro-batch)."""
    ds = set_adam(resolve_ds_config(load_ds_config(ds_path), recipe, world=1), adam)
    engine, optimizer, dtype = build_engine(task, recipe, ds)
    if compile_model:
        engine.compile()
    lr = float(ds["optimizer"]["params"]["lr"])

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        apply_lr(optimizer, lr)
        return train_micro_step(engine, task, images, labels, dtype)

    zero = ds.get("zero_optimization", {})
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch / DeepSpeed optimizer inside ZeRO's wrapper
    info = {"variant": adam, "ds_config": relative(ds_path), "zero_stage": zero.get("stage", 0),
            "offload": "offload_optimizer" in zero, "optimizer": type(inner).__name__,
            "optimizer_fused": getattr(inner, "defaults", {}).get("fused"),
            "dtype": str(dtype).replace("torch.", ""), "param_groups": len(optimizer.param_groups),
            "prepare_batch": "device"}
    return Runner(step, engine.device, info, [engine])


def eager_runner(s: Settings, recipe: Recipe, task: Task, device: torch.device, *, compile_model: bool,
                 variant: str) -> Runner:
    """A plain eager loop of the same model, groups, learning rate and loss as ``project_runner``."""
    if variant not in EAGER_VARIANTS:
        raise ConfigError(f"eager {variant!r}: use one of {', '.join(EAGER_VARIANTS)}")
    ds = resolve_ds_config(load_ds_config(s.ds_config), recipe, world=1)
    params = ds["optimizer"]["params"]
    cuda = device.type == "cuda"
    pure = variant == "pure-foreach"
    dtype = engine_dtype(ds) if pure else torch.float32
    seed_everything(recipe.train.seed)  # the engine's initial weights
    model = task.build_model().to(device=device, dtype=dtype)
    model.train()
    groups = param_groups(model, params.get("weight_decay", 0.0), recipe.train.layer_decay)
    lr = float(params["lr"])
    kind = {"foreach": True} if pure else {"fused": cuda}
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(params.get("betas", (0.9, 0.999))),
                            eps=params.get("eps", 1e-8), **kind)
    if compile_model:
        model.compile()
    amp = not pure and cuda

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        apply_lr(opt, lr)
        images, targets = task.prepare_batch(images.to(device, non_blocking=True),
                                             labels.to(device, non_blocking=True))
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = task.loss(model, images.to(dtype), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    info = {"variant": variant, "dtype": "bf16 autocast" if amp else str(dtype).replace("torch.", ""),
            "optimizer": "AdamW", "optimizer_fused": bool(kind.get("fused")), "optimizer_foreach": pure,
            "param_groups": len(groups), "prepare_batch": "device"}
    return Runner(step, device, info, [])
