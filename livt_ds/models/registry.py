"""Explicit name -> size map for the ViTs we train, and the two constructors the tasks call.

The constructors take the recipe's typed ``model`` section (ModelConfig), so every model default has one home.

Sizes follow ViT/DeiT (patch size and image size are separate arguments); `vit_test` and `vit_demo` are tiny
widths for CPU tests and the built-in demo.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from livt_ds.config import ModelConfig
from livt_ds.models.mae import MaskedAutoencoder
from livt_ds.models.vit import fp32_head

__all__ = ["ViTSize", "MODEL_SIZES", "MLP_RATIO", "get_size", "build_mae", "build_classifier"]


@dataclass(frozen=True)
class ViTSize:
    """Width, depth and number of attention heads of a ViT encoder."""

    embed_dim: int
    depth: int
    num_heads: int


MODEL_SIZES: dict[str, ViTSize] = {
    "vit_test": ViTSize(embed_dim=32, depth=2, num_heads=2),
    "vit_demo": ViTSize(embed_dim=64, depth=4, num_heads=4),
    "vit_tiny": ViTSize(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ViTSize(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTSize(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ViTSize(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": ViTSize(embed_dim=1280, depth=32, num_heads=16),
}

GLOBAL_POOLS = ("avg", "token")
MLP_RATIO = 4.0  # hidden width of every block's MLP / embed width (ViT, DeiT and MAE; encoder and MGP decoder)


def get_size(name: str) -> ViTSize:
    """Look up a model size by name; unknown names raise ValueError listing the valid ones."""
    try:
        return MODEL_SIZES[name]
    except KeyError:
        raise ValueError(f"model.name={name!r} is not a known model; valid names: {', '.join(MODEL_SIZES)}") from None


def _check_grid(img_size: int, patch_size: int) -> None:
    if img_size <= 0 or patch_size <= 0 or img_size % patch_size != 0:
        raise ValueError(
            f"model.img_size={img_size} must be a positive multiple of model.patch_size={patch_size}"
        )


def build_mae(model: ModelConfig) -> MaskedAutoencoder:
    """MGP model for the recipe's ``model`` section: encoder ``model.name`` at ``model.img_size``, decoder and
    masking from the same section (the defaults live in ModelConfig)."""
    size = get_size(model.name)
    _check_grid(model.img_size, model.patch_size)
    return MaskedAutoencoder(
        model.img_size, model.patch_size, size.embed_dim, size.depth, size.num_heads,
        mask_ratio=model.mask_ratio, norm_pix=model.norm_pix, decoder_dim=model.decoder_dim,
        decoder_depth=model.decoder_depth, decoder_heads=model.decoder_heads, mlp_ratio=MLP_RATIO,
    )


def build_classifier(model: ModelConfig, num_classes: int) -> VisionTransformer:
    """BFT classifier for the recipe's ``model`` section: timm ViT with a linear head (trunc-normal std 2e-5, bias 0).

    model.global_pool "avg": mean of the patch tokens then LayerNorm (timm's `fc_norm`; the final `norm` is
    Identity); "token": the cls token after the final `norm`. The cls token exists in both cases, so the trunk's
    keys match the MGP encoder's. Input [B,3,img_size,img_size] -> fp32 logits [B, num_classes]: the last
    LayerNorm and the head compute in fp32 under a bf16 engine or autocast too (`fp32_head`).
    """
    size = get_size(model.name)
    _check_grid(model.img_size, model.patch_size)
    if model.global_pool not in GLOBAL_POOLS:
        raise ValueError(f"model.global_pool={model.global_pool!r} is not supported; use one of {GLOBAL_POOLS}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    classifier = VisionTransformer(
        img_size=model.img_size, patch_size=model.patch_size, num_classes=num_classes, global_pool=model.global_pool,
        embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, mlp_ratio=MLP_RATIO, qkv_bias=True,
        class_token=True, drop_path_rate=model.drop_path,
    )
    fp32_head(classifier)
    assert isinstance(classifier.head, nn.Linear)
    trunc_normal_(classifier.head.weight, std=2e-5)
    nn.init.zeros_(classifier.head.bias)
    return classifier
