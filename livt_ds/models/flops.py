"""Analytic model FLOPs per image of a pretraining (MGP) or a fine-tuning (BFT) training step (the convention of
docs/gpu.md).

A transformer layer on N tokens of width d costs 24*N*d^2 (qkv, projection, 4x MLP) + 4*N^2*d (q.k^T and
attention x v) forward FLOPs, counting a multiply-add as 2; a training step is 3x the forward (the backward
pass costs twice the forward). LayerNorm, softmax and GELU are left out, as in the reference figures.
"""

from __future__ import annotations

from livt_ds.config import ModelConfig
from livt_ds.models.registry import get_size

STAGES = ("pretrain", "finetune")
FORMULA = ("per layer 24*N*d^2 + 4*N^2*d forward, x3 for training; MGP encoder on N = round(L*(1-r))+1 "
           "visible tokens + decoder on L+1 tokens at decoder width; BFT encoder on L+1 tokens. "
           "model_tflops counts the layers only (as the reference figures in docs/gpu.md); "
           "model_tflops_with_embed_heads "
           "adds patch embedding, decoder embed/prediction and the classifier head.")


def layer_flops(tokens: int, width: int) -> int:
    """Forward FLOPs of one transformer layer on ``tokens`` tokens of width ``width``."""
    return 24 * tokens * width**2 + 4 * tokens**2 * width


def flops_per_image(stage: str, model: ModelConfig, *, num_classes: int) -> dict[str, int]:
    """FLOPs per image of one ``stage`` ("pretrain" or "finetune") step of the recipe's ``model``.

    Returns ``layers_fwd`` (transformer layers only, the reference figures' convention), ``extras_fwd`` (patch
    embedding, decoder embed and prediction, or the classifier head), ``train`` = 3 x layers and
    ``train_with_extras`` = 3 x (layers + extras). L = (img_size / patch_size)^2 patches.
    MGP: encoder on the N = round(L * (1 - mask_ratio)) + 1 visible tokens (with cls), decoder on L + 1 tokens
    at ``decoder_dim``. BFT: encoder on L + 1 tokens, head ``num_classes`` wide (MGP ignores it).
    """
    size = get_size(model.name)
    patches = (model.img_size // model.patch_size) ** 2
    pixels = 3 * model.patch_size**2
    d, dd = size.embed_dim, model.decoder_dim
    embed = 2 * patches * pixels * d
    if stage == "pretrain":
        visible = int(round(patches * (1.0 - model.mask_ratio))) + 1
        layers = size.depth * layer_flops(visible, d) + model.decoder_depth * layer_flops(patches + 1, dd)
        extras = embed + 2 * visible * d * dd + 2 * (patches + 1) * dd * pixels
    elif stage == "finetune":
        layers = size.depth * layer_flops(patches + 1, d)
        extras = embed + 2 * d * num_classes
    else:
        raise ValueError(f"stage {stage!r}: use one of {', '.join(STAGES)}")
    return {"layers_fwd": layers, "extras_fwd": extras, "train": 3 * layers, "train_with_extras": 3 * (layers + extras)}
