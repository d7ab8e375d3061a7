"""livt_ds/models/flops.py: the analytic count against a hand count and against the matmuls the built models run."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from livt_ds.config import load_recipe
from livt_ds.models.flops import flops_per_image, layer_flops
from livt_ds.tasks import build_task

# vit_test (width 32, depth 2) at 8 px with 4-px patches: L = 4 patches of 3 * 4 * 4 = 48 pixels.
TINY = ["model.name=vit_test", "model.img_size=8", "model.patch_size=4", "model.mask_ratio=0.5",
        "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2"]


def test_layer_flops_by_hand():
    # 3 tokens of width 32: qkv 2*3*32*96 + proj 2*3*32*32 + MLP 2*(2*3*32*128) = 73,728; q.k^T and a.v 2*2*9*32
    assert layer_flops(3, 32) == 73_728 + 1_152


def test_pretrain_count_by_hand():
    f = flops_per_image("pretrain", load_recipe(None, TINY).model, num_classes=10)
    # encoder on round(4 * 0.5) + 1 = 3 visible tokens, 2 layers; decoder on 5 tokens at width 16, 1 layer
    layers = 2 * (24 * 3 * 32**2 + 4 * 3**2 * 32) + (24 * 5 * 16**2 + 4 * 5**2 * 16)
    assert layers == 182_080
    # patch embedding 4 x 48 -> 32, decoder embed 3 x 32 -> 16, prediction 5 x 16 -> 48
    extras = 2 * 4 * 48 * 32 + 2 * 3 * 32 * 16 + 2 * 5 * 16 * 48
    assert f == {"layers_fwd": layers, "extras_fwd": extras, "train": 3 * layers,
                 "train_with_extras": 3 * (layers + extras)}


def test_finetune_count_by_hand():
    f = flops_per_image("finetune", load_recipe(None, TINY).model, num_classes=10)
    layers = 2 * (24 * 5 * 32**2 + 4 * 5**2 * 32)  # encoder on 4 patches + cls
    extras = 2 * 4 * 48 * 32 + 2 * 32 * 10  # patch embedding, head
    assert (f["layers_fwd"], f["extras_fwd"], f["train"]) == (layers, extras, 3 * layers)


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="stage 'eval'"):
        flops_per_image("eval", load_recipe(None, TINY).model, num_classes=10)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_count_equals_the_matmuls_of_the_built_model(stage):
    """torch's FLOP counter on one forward of the model the trainer builds (all matmuls, convolutions and
    attention) equals layers + extras: the formula describes the shipped models, not an idealised ViT.
    The math attention backend runs q.k^T and a.v as bmm, which the counter sees (the CPU fused kernel it does not)."""
    recipe = load_recipe(None, [*TINY, "model.img_size=16"])  # 16 patches, 8 visible
    meta = {"num_classes": 10, "class_counts": [10 - i for i in range(10)], "classes": [f"c{i}" for i in range(10)]}
    model = build_task(stage, recipe, meta).build_model().eval()
    expected = flops_per_image(stage, recipe.model, num_classes=10)
    images = torch.randn(2, 3, 16, 16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    assert counter.get_total_flops() == 2 * (expected["layers_fwd"] + expected["extras_fwd"])
