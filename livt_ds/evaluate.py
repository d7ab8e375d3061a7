"""`livt eval`: a BFT model (run folder, checkpoint or export) on a shard set's eval split, data-parallel.

Weights are consolidated to fp32 and run as a plain module (no optimizer, no ZeRO partitioning needed);
bf16 autocast on GPU when the DeepSpeed config enables bf16.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from livt_ds import dist
from livt_ds.checkpoint import CheckpointError, weights_provenance
from livt_ds.config import ConfigError, Recipe, load_ds_config, save_recipe
from livt_ds.data.pipeline import eval_loader
from livt_ds.data.remote import RemoteOptions
from livt_ds.data.shards import load_meta
from livt_ds.tasks import FinetuneTask, save_images


def run_eval(recipe: Recipe, ds_config_path: str, output: str | Path) -> dict[str, Any]:
    if not recipe.model.init:
        raise ConfigError("livt eval needs model.init=RUN_OR_EXPORT (a BFT run folder, checkpoint or export .pt)")
    if not recipe.data.path:
        raise ConfigError("data.path is empty: point it at a shard set made by scripts/make_shards.py")
    output = Path(output)
    remote = RemoteOptions.from_config(recipe.data)
    meta = load_meta(recipe.data.path, remote)
    task = FinetuneTask(recipe, meta)
    model = task.build_model()
    missing = task.init_report["missing"]
    if missing:
        raise CheckpointError(f"model.init={recipe.model.init} lacks {missing[:5]} (an MGP encoder or another "
                              "number of classes?): evaluate a BFT (finetune) run of this data set")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = model.to(device).eval()
    bf16 = bool(load_ds_config(ds_config_path).get("bf16", {}).get("enabled")) and device.type == "cuda"

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext():
            return model(images)

    loader = eval_loader(recipe.data.path, split=recipe.data.eval_split, transform=task.eval_transform(),
                         batch_size=recipe.eval.batch_size, num_workers=recipe.data.num_workers,
                         rank=dist.rank(), world_size=dist.world_size(), remote=remote)
    result = task.evaluate(forward, model, loader, lambda x: x.to(device, non_blocking=True))
    result.metrics["provenance"] = weights_provenance(recipe.model.init) if dist.is_main() else None
    if dist.is_main():
        output.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, output / "config.yaml")
        (output / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
        save_images(result.images, output / "plots", 0)
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(output / "tensorboard")) as writer:
            for key, value in result.metrics.items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"eval/{key}", value, 0)
            for name, image in result.images.items():
                writer.add_image(f"eval/{name}", image, 0)
    return result.metrics
