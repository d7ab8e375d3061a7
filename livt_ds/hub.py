"""Exports in timm's hub layout: ``model.safetensors`` + ``config.json``, loadable by plain timm.

``timm.create_model("local-dir:EXPORT", pretrained=True)`` builds the model from ``config.json`` (architecture,
``model_args`` for the sizes that are not stock timm names, ``num_classes``, ``label_names``) and loads the
weights; ``timm.data.resolve_data_config(model=model)`` gives the eval transform from ``pretrained_cfg`` (mean,
std, input_size, interpolation, crop_pct). A BFT run exports the classifier, an MGP run its encoder
(``num_classes`` 0: the model returns the cls-token features). What livt needs beyond timm (the training class
counts and loss, for test-prior adjustment) lives under the ``livt`` key, which timm ignores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from livt_ds.config import Recipe, recipe_to_dict
from livt_ds.data.transforms import default_crop_pct
from livt_ds.models.registry import MLP_RATIO, get_size
from livt_ds.run_files import follow_umask

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Our sizes -> the timm architecture of that width/depth; model_args always carry every size argument, so
# sizes timm does not name (vit_test, vit_demo) and other image/patch sizes build the same way.
TIMM_ARCHITECTURES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


def hub_config(
    recipe: Recipe,
    stage: str,
    class_names: Sequence[str],
    class_counts: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    tag: str | None = None,
) -> dict[str, Any]:
    """config.json of a ``finetune`` classifier or a ``pretrain`` encoder (``num_classes`` 0) in timm's layout."""
    m = recipe.model
    size = get_size(m.name)
    classifier = stage == "finetune"
    num_classes = len(class_names) if classifier else 0
    global_pool = m.global_pool if classifier else "token"  # the MGP encoder: cls token after the final norm
    model_args = {"img_size": m.img_size, "patch_size": m.patch_size, "embed_dim": size.embed_dim,
                  "depth": size.depth, "num_heads": size.num_heads, "mlp_ratio": MLP_RATIO, "qkv_bias": True,
                  "class_token": True, "global_pool": global_pool}
    crop_pct = recipe.augment.crop_pct if recipe.augment.crop_pct is not None else default_crop_pct(m.img_size)
    config: dict[str, Any] = {
        "architecture": TIMM_ARCHITECTURES.get(m.name, "vit_base_patch16_224"),
        "num_classes": num_classes,
        "num_features": size.embed_dim,
        "global_pool": global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, m.img_size, m.img_size], "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": crop_pct, "crop_mode": "center", "mean": [float(x) for x in mean],
            "std": [float(x) for x in std], "num_classes": num_classes, "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    if classifier:
        config["label_names"] = [str(n) for n in class_names]
    config["livt"] = {"stage": stage, "model": m.name, "tag": tag, "class_counts": [int(c) for c in class_counts],
                      "loss": {"name": recipe.loss.name, "tau": recipe.loss.tau, "test_prior": recipe.loss.test_prior},
                      "recipe": recipe_to_dict(recipe)}
    return config


def model_weights(state: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
    """The timm model's state dict from a run's consolidated weights (the MAE's ``encoder.*`` for MGP)."""
    if stage == "pretrain":
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    # own, contiguous storage: consolidated weights can be views of one flat buffer, which safetensors refuses
    return {k: v.detach().float().clone().contiguous() for k, v in state.items()}


def write_export(folder: Path, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> list[Path]:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    follow_umask(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return [folder / WEIGHTS_NAME, folder / CONFIG_NAME]


def build_timm_model(config: dict[str, Any]) -> nn.Module:
    """The model config.json describes, built by timm (random weights; load the export's state dict into it)."""
    return timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"],
                             **config.get("model_args", {}))
