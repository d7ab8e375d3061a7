"""The classifier's last LayerNorm and head compute in fp32: a bf16 DeepSpeed engine (on CPU) and bf16 autocast give
the logits an fp32 head gives on the same features, not logits rounded to bf16."""

from __future__ import annotations

import os

import torch
from conftest import REPO
from torch import nn

from livt_ds.config import load_ds_config, load_recipe, resolve_ds_config
from livt_ds.models.registry import build_classifier
from livt_ds.tasks import FinetuneTask

NUM_CLASSES = 1000  # enough classes that bf16 logits would tie and round visibly


def tiny_recipe():
    return load_recipe(REPO / "configs" / "tiny_bft.yaml", ["model.init=", "train.micro_batch=4"])


def meta() -> dict:
    counts = [max(1, 500 - i // 2) for i in range(NUM_CLASSES)]
    return {"num_classes": NUM_CLASSES, "class_counts": counts, "classes": [f"c{i}" for i in range(NUM_CLASSES)]}


def fp32_reference(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """A plain fp32 LayerNorm + Linear holding the model's own (possibly bf16) weights, on the pooled features."""
    norm = nn.LayerNorm(model.fc_norm.normalized_shape, eps=model.fc_norm.eps)
    head = nn.Linear(model.head.in_features, model.head.out_features)
    norm.load_state_dict({k: v.float() for k, v in model.fc_norm.state_dict().items()})
    head.load_state_dict({k: v.float() for k, v in model.head.state_dict().items()})
    return head(norm(pooled.float()))


def capture_pooled(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.fc_norm.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    return seen


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


@torch.no_grad()
def test_bf16_engine_eval_logits_equal_an_fp32_head():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from livt_ds import dist
    from livt_ds.engine import build_engine

    dist.init_distributed()
    recipe = tiny_recipe()
    task = FinetuneTask(recipe, meta())
    ds = resolve_ds_config(load_ds_config(REPO / "ds_configs" / "zero2_bf16.json"), recipe, world=1)
    engine, _, dtype = build_engine(task, recipe, ds)
    try:
        assert dtype == torch.bfloat16 and engine.module.head.weight.dtype == torch.bfloat16
        engine.module.head.weight.normal_(0, 0.5)  # logits of order 1, where bf16 keeps 3 significant digits
        engine.eval()
        seen = capture_pooled(engine.module)
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        logits = engine(images.to(dtype))  # what the trainer's evaluation calls
        assert logits.dtype == torch.float32
        assert seen[0].dtype == torch.bfloat16  # the trunk did run in bf16
        assert relative_error(logits, fp32_reference(engine.module, seen[0])) < 1e-5
    finally:
        engine.destroy()


@torch.no_grad()
def test_autocast_eval_logits_equal_an_fp32_head():
    """`livt eval` on a GPU runs the fp32 model under bf16 autocast; the head stays out of it."""
    model = build_classifier(tiny_recipe().model, NUM_CLASSES).eval()
    model.head.weight.normal_(0, 0.5)
    seen = capture_pooled(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert logits.dtype == torch.float32
    assert relative_error(logits, fp32_reference(model, seen[0])) < 1e-5
