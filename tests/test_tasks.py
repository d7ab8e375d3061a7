"""What the stages promise without a launcher: predictions and metrics on raw logits (the balanced bias only in the
loss), the mean/std precedence, and the optimizer's parameter groups (weight decay, layer-wise lr scale)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from livt_ds.config import ModelConfig, load_recipe
from livt_ds.models.registry import build_classifier, build_mae
from livt_ds.optim import param_groups
from livt_ds.tasks import FinetuneTask, PretrainTask

REPO = Path(__file__).resolve().parents[1]
COUNTS = [990, 10]  # prior 0.99 / 0.01: Bal-BCE's bias is log(pi / (1 - pi)) = +-4.595


def finetune_task(loss: str, *overrides: str, meta: dict | None = None) -> FinetuneTask:
    recipe = load_recipe(REPO / "configs" / "tiny_bft.yaml", [f"loss.name={loss}", "model.init=", *overrides])
    return FinetuneTask(recipe, meta or {"class_counts": COUNTS, "num_classes": 2})


@pytest.mark.parametrize("loss", ["bal_bce", "bal_ce"])
def test_balanced_bias_is_in_the_loss_only_metrics_use_raw_logits(loss):
    """Logits whose raw argmax is the tail class and whose biased argmax (z + log-prior terms) is the head class:
    the evaluation must score the raw argmax, while the loss must see the bias."""
    task = finetune_task(loss)
    tail = torch.tensor([[0.0, 1.0]]).repeat(6, 1)  # raw argmax: class 1 (tail); z + B: class 0 (head)
    head = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    logits = torch.cat([tail, head])
    labels = torch.tensor([1] * 6 + [0] * 4)
    if loss == "bal_bce":  # log pi - log(1 - pi) + log(C - 1), C = 2
        bias = torch.tensor([math.log(0.99 / 0.01), math.log(0.01 / 0.99)])
    else:  # log pi - log(1 / C)
        bias = torch.tensor([math.log(0.99 * 2), math.log(0.01 * 2)])
    assert ((logits + bias).argmax(1) == 0).all()  # with the bias every prediction would be the head class

    loader = [(logits[:7], labels[:7]), (logits[7:], labels[7:])]
    result = task.evaluate(lambda x: x, None, loader, lambda x: x)
    m = result.metrics
    assert m["num_samples"] == 10 and m["top1"] == pytest.approx(100.0)  # raw argmax: all correct
    assert m["per_class"] == [pytest.approx(100.0), pytest.approx(100.0)]
    confidence = F.softmax(logits, 1).max(1).values.mean().item()  # raw softmax confidence, not the biased one
    rel = m["reliability"]
    weighted = sum(c * n for c, n in zip(rel["confidence"], rel["count"]) if n) / sum(rel["count"])
    assert weighted == pytest.approx(confidence, abs=1e-6)
    assert m["ece"] == pytest.approx(100 * (1 - confidence), abs=1e-4)  # every sample right: ECE = 1 - confidence

    plain = finetune_task(loss.removeprefix("bal_")).criterion(logits, labels)
    biased = task.criterion(logits, labels)
    y = F.one_hot(labels, 2).float()
    if loss == "bal_bce":
        by_hand = F.binary_cross_entropy_with_logits(logits + bias, y, reduction="none").sum(1).mean()
    else:
        by_hand = -(y * F.log_softmax(logits + bias, 1)).sum(1).mean()
    torch.testing.assert_close(biased, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(biased, plain)


def flat(value=(51, 102, 204)) -> Image.Image:
    return Image.new("RGB", (40, 40), value)


def normalised_mean(transform) -> torch.Tensor:
    return transform(flat()).mean((1, 2))


def expected(mean, std) -> torch.Tensor:
    return (torch.tensor([51, 102, 204]) / 255 - torch.tensor(mean)) / torch.tensor(std)


def test_mean_std_precedence_recipe_then_meta_then_imagenet():
    meta = {"class_counts": COUNTS, "num_classes": 2, "mean": [0.3, 0.2, 0.1], "std": [0.5, 0.4, 0.3]}
    recipe_vals = ["data.mean=[0.6, 0.5, 0.4]", "data.std=[0.2, 0.25, 0.3]"]
    cases = [
        (recipe_vals, meta, ([0.6, 0.5, 0.4], [0.2, 0.25, 0.3])),  # the recipe wins over meta.json
        ([], meta, ([0.3, 0.2, 0.1], [0.5, 0.4, 0.3])),  # else meta.json (measured by make_shards)
        ([], {"class_counts": COUNTS, "num_classes": 2}, ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])),  # ImageNet
    ]
    for overrides, m, (mean, std) in cases:
        bft = finetune_task("bal_bce", "augment.crop_pct=1.0", *overrides, meta=m)
        mgp = PretrainTask(load_recipe(REPO / "configs" / "tiny_mgp.yaml", overrides), m)
        for transform in (bft.eval_transform(), mgp.eval_transform()):
            torch.testing.assert_close(normalised_mean(transform), expected(mean, std), rtol=0, atol=1e-5)
        crop = mgp.train_transform()  # uint8 crops; the task normalises the batch (on the device)
        png = io.BytesIO()
        flat().save(png, format="PNG")
        images, _ = mgp.prepare_batch(crop.collate([crop(crop.load(crop.draw(png.getvalue())))]),
                                      torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(images[0].mean((1, 2)), expected(mean, std), rtol=0, atol=1e-5)


def layer_of(name: str, depth: int) -> int:
    """BEiT layer id: embeddings 0, block i -> i + 1, everything after the blocks depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms and biases (1-D), the tokens and the position embeddings are not decayed."""
    return param.ndim <= 1 or name.split(".")[-1] in ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed")


def groups_by_name(model: torch.nn.Module, groups: list[dict]) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict] = {}
    for group in groups:
        for p in group["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} is in two groups"
            out[names[id(p)]] = group
    return out


def test_layer_decay_scales_and_no_weight_decay_groups():
    torch.manual_seed(0)
    model = build_classifier(ModelConfig("vit_test", 32, 8), 4)  # depth 2
    by_name = groups_by_name(model, param_groups(model, 0.05, 0.75))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable
    params = dict(model.named_parameters())
    for name, group in by_name.items():
        assert group["lr_scale"] == pytest.approx(0.75 ** (3 - layer_of(name, 2)), rel=1e-12), name
        assert group["weight_decay"] == (0.0 if no_decay(name, params[name]) else 0.05), name
    scales = {name: by_name[name]["lr_scale"] for name in ("pos_embed", "blocks.0.attn.qkv.weight", "head.weight")}
    assert scales == pytest.approx({"pos_embed": 0.421875, "blocks.0.attn.qkv.weight": 0.5625, "head.weight": 1.0})


def test_mgp_groups_decay_only_matrices():
    torch.manual_seed(0)
    model = build_mae(ModelConfig("vit_test", 32, 8, decoder_dim=32, decoder_depth=1, decoder_heads=2))
    groups = param_groups(model, 0.05, 1.0)
    by_name = groups_by_name(model, groups)
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    for name, group in by_name.items():
        assert group["weight_decay"] == (0.0 if no_decay(name, params[name]) else 0.05), name
        assert group.get("lr_scale", 1.0) == 1.0
    decayed = sorted(n for n, g in by_name.items() if g["weight_decay"])
    assert decayed and all(params[n].ndim >= 2 for n in decayed) and "mask_token" not in decayed
    assert np.sum([params[n].numel() for n in by_name]) == sum(p.numel() for p in model.parameters() if p.requires_grad)
