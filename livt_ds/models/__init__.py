"""ViT models: MGP masked autoencoder, BFT classifier and the name -> size registry."""

from livt_ds.models.mae import MaskedAutoencoder, sincos_pos_embed_2d
from livt_ds.models.registry import MLP_RATIO, MODEL_SIZES, ViTSize, build_classifier, build_mae, get_size
from livt_ds.models.vit import interpolate_pos_embed, load_encoder_weights

__all__ = [
    "MLP_RATIO",
    "MODEL_SIZES",
    "MaskedAutoencoder",
    "ViTSize",
    "build_classifier",
    "build_mae",
    "get_size",
    "interpolate_pos_embed",
    "load_encoder_weights",
    "sincos_pos_embed_2d",
]
