"""Plain fp32 weights out of a run: consolidation of ZeRO checkpoints, ``model.init`` loading, and export.

Exports: ``model.safetensors`` + ``config.json`` in timm's hub layout (livt_ds/hub.py), and ``model.pt``
``{"model": fp32 state dict, "recipe": dict, "stage": str, "tag": str, ...}`` (plain data, loads with
``weights_only=True``). Weights are read without unpickling arbitrary objects (livt_ds/safe_load.py).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from livt_ds.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_checkpoint,
    latest_tag,
    model_states,
    saved_param_shapes,
    saved_recipe,
    to_universal,
)


def written_by_bf16_optimizer(tag_dir: Path) -> bool:
    """True for a checkpoint of DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16 + fp32 gradient accumulation): its
    optimizer state has no ``zero_stage``, so DeepSpeed's zero_to_fp32 cannot read it."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    from livt_ds.safe_load import load_torch_file

    files = sorted(glob.glob(str(tag_dir / "*_optim_states.pt")))
    if not files:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer shards (*_optim_states.pt); "
                              "not a livt/DeepSpeed checkpoint")
    optim = load_torch_file(files[0], mmap=True)[OPTIMIZER_STATE_DICT]
    return ZERO_STAGE not in optim


def universal_state_dict(uni_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 parameters from a universal checkpoint folder (``zero/<name>/fp32.pt``, flat or shaped, bare or as
    ``{"param": tensor}``) reshaped to the recorded shapes, plus the buffers of its model states file."""
    from livt_ds.safe_load import load_torch_file

    states = model_states(uni_dir)
    out: dict[str, torch.Tensor] = {}
    for name, shape in saved_param_shapes(states).items():
        path = uni_dir / "zero" / name / "fp32.pt"
        if not path.is_file():
            raise CheckpointError(f"{uni_dir}: {path.relative_to(uni_dir)} missing; the universal conversion is "
                                  f"incomplete (delete {uni_dir} to redo it)")
        saved = load_torch_file(path)
        tensor = saved["param"] if isinstance(saved, dict) else saved
        out[name] = tensor.float().reshape(shape)
    module = states.get("module") or {}
    out.update({name: module[name] for name in states.get("buffer_names") or [] if name in module})
    return out


def consolidate(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 parameters and buffers of a ZeRO-1/2/3 checkpoint, without DeepSpeed engines.

    DeepSpeed's zero_to_fp32 reads ZeRO checkpoints; a BF16_Optimizer checkpoint (ZeRO-1 with fp32 gradient
    accumulation) goes through the universal format instead (converted once next to it, ``<tag>_universal``; a
    collective when a process group is up). Every tensor the engine saved in the module state dict must come back:
    a checkpoint that lost one (a frozen parameter under ZeRO-1) is an error, never a silently partial model.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = ckpt_dir / tag
    try:
        if written_by_bf16_optimizer(tag_dir):
            state = universal_state_dict(ckpt_dir / to_universal(ckpt_dir, tag))
        else:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - report which checkpoint failed and why
        raise CheckpointError(f"{tag_dir}: cannot consolidate to fp32 weights: {exc}") from exc
    lost = sorted(set(model_states(tag_dir).get("module") or {}) - set(state))
    if lost:
        raise CheckpointError(f"{tag_dir}: the checkpoint lacks the fp32 values of {lost[:8]} (frozen parameters "
                              "that this ZeRO stage does not save?); it cannot be exported or used as model.init")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


WEIGHT_FILES = ("model.safetensors", "model.pt")  # in a folder, the first found wins


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from an export file (.safetensors, or .pt read with ``weights_only=True``), an export folder, a run
    folder (its export, else its latest checkpoint), a checkpoint folder with ``latest``, or a tag folder.
    Nothing is unpickled beyond tensors, plain data and the allow-list of ``livt_ds.safe_load``."""
    from livt_ds.safe_load import load_torch_file, weights_only_loading

    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = load_torch_file(path)
        return obj.get("model", obj) if isinstance(obj, dict) else obj
    for folder in (path / "export", path):
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return load_weights(folder / name)
    found = find_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"model.init={path}: not found (expected an export (model.safetensors or .pt), a run "
                              "folder, or a checkpoint)")
    with weights_only_loading(found[0] / found[1]):
        return consolidate(*found)


def weights_provenance(path: str | Path) -> dict[str, Any]:
    """Where the weights behind ``path`` (as ``load_weights`` resolves it) were trained: run folder, checkpoint
    tag and the sha256 of the recipe they were trained with, so a metrics.json can be traced to its weights."""
    from livt_ds.provenance import model_provenance

    path = Path(path)
    folders = [path.parent] if path.is_file() else [path / "export", path]
    for folder in folders:
        config = folder / "config.json"
        if config.is_file() and any((folder / name).is_file() for name in WEIGHT_FILES):
            livt = json.loads(config.read_text()).get("livt", {})
            info = livt.get("provenance") or model_provenance(None, livt.get("tag"), livt.get("recipe"))
            return {**info, "weights": str(path.resolve())}
    if path.is_file():
        return {**model_provenance(None, None, None), "weights": str(path.resolve())}
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: not a run folder, checkpoint or export")
    ckpt_dir, tag = found
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else None
    return {**model_provenance(run_dir, tag, saved_recipe(ckpt_dir / tag)), "weights": str(path.resolve())}


def run_export_config(run_dir: Path, tag: str) -> dict[str, Any]:
    """timm hub config.json of a run: model from its recipe, class names and counts from its shard set."""
    from livt_ds.config import recipe_from_dict
    from livt_ds.data.shards import load_meta, train_class_counts
    from livt_ds.data.transforms import normalisation
    from livt_ds.hub import hub_config

    run_info = yaml.safe_load((run_dir / "run.yaml").read_text()) if (run_dir / "run.yaml").is_file() else {}
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml; not a livt run folder")
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    try:
        meta = load_meta(recipe.data.path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{run_dir}: the run's shard set is needed once, to record the class names and "
                              f"counts in the export: {exc}") from None
    stage = run_info.get("stage") or "finetune"
    mean, std = normalisation(recipe, meta)
    return hub_config(recipe, stage, meta["classes"], train_class_counts(meta, recipe.data.train_split), mean, std,
                      tag=tag)


def export(run_dir: str | Path, output: str | Path | None = None, tag: str | None = None) -> list[Path]:
    """Write ``model.safetensors`` + ``config.json`` (timm's hub layout: the classifier, or the encoder of an MGP
    run) and, for compatibility, ``model.pt`` (and ``encoder.pt`` for MGP): consolidated fp32 weights."""
    from livt_ds.hub import model_weights, write_export
    from livt_ds.provenance import model_provenance
    from livt_ds.safe_load import weights_only_loading

    run_dir = Path(run_dir)
    output = Path(output) if output else run_dir / "export"
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to export (no 'latest'); has the run saved one?")
    config = run_export_config(run_dir, tag)
    trained_with = saved_recipe(ckpt_dir / tag) or config["livt"]["recipe"]
    config["livt"]["provenance"] = model_provenance(run_dir, tag, trained_with)
    with weights_only_loading(ckpt_dir / tag):
        state = consolidate(ckpt_dir, tag)
    stage = config["livt"]["stage"]
    written = write_export(output, config, model_weights(state, stage))
    payload = {"recipe": config["livt"]["recipe"], "stage": stage, "tag": tag,
               "num_classes": len(config["livt"]["class_counts"]), "class_names": config.get("label_names"),
               "class_counts": config["livt"]["class_counts"], "mean": config["pretrained_cfg"]["mean"],
               "std": config["pretrained_cfg"]["std"], "provenance": config["livt"]["provenance"]}
    torch.save({**payload, "model": state}, output / "model.pt")
    written.append(output / "model.pt")
    if stage == "pretrain":
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        torch.save({**payload, "model": encoder}, output / "encoder.pt")
        written.append(output / "encoder.pt")
    return written
