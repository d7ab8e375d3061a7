"""Plain fp32 weights out of a run: consolidation of ZeRO checkpoints, ``model.init`` loading, the one builder of
the inference model (`load_classifier`, for `livt eval` and `livt predict`), and export.

Exports: ``model.safetensors`` + ``config.json`` in timm's hub layout (livt_ds/hub.py), and ``model.pt``
``{"model": fp32 state dict, "recipe": dict, "stage": str, "tag": str, ...}`` (plain data, loads with
``weights_only=True``). Weights are read without unpickling arbitrary objects (livt_ds/safe_load.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from livt_ds import dist
from livt_ds.checkpoint import (
    checkpoint_dir,
    latest_tag,
    model_states,
    optimizer_shards,
    saved_param_shapes,
    saved_recipe,
    to_universal,
)
from livt_ds.config import recipe_from_dict
from livt_ds.console import held_output
from livt_ds.data.shards import train_class_counts
from livt_ds.data.transforms import normalisation
from livt_ds.errors import CheckpointError
from livt_ds.hub import CONFIG_NAME, build_timm_model, hub_config, model_weights, write_export
from livt_ds.model_record import ModelSource, checkpoint_recipe, checkpoint_stage, recipe_meta, resolve_model
from livt_ds.models.vit import fp32_head
from livt_ds.provenance import model_provenance
from livt_ds.run_files import EXPORT
from livt_ds.safe_load import load_torch_file, weights_only_loading
from livt_ds.tasks import Task


def written_by_bf16_optimizer(tag_dir: Path) -> bool:
    """True for a checkpoint of DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16 + fp32 gradient accumulation): its
    optimizer state has no ``zero_stage``, so DeepSpeed's zero_to_fp32 cannot read it."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    optim = load_torch_file(optimizer_shards(tag_dir)[0], mmap=True)[OPTIMIZER_STATE_DICT]
    return ZERO_STAGE not in optim


def universal_state_dict(uni_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 parameters from a universal checkpoint folder (``zero/<name>/fp32.pt``, flat or shaped, bare or as
    ``{"param": tensor}``) reshaped to the recorded shapes, plus the buffers of its model states file."""
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


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from an export file (.safetensors, or .pt read with ``weights_only=True``), an export folder, a run
    folder (its export while it is of the latest checkpoint, else that checkpoint), a checkpoint folder with
    ``latest``, or a tag folder. Nothing is unpickled beyond tensors, plain data and the allow-list of
    ``livt_ds.safe_load``."""
    return source_weights(resolve_model(path))


def source_weights(source: ModelSource) -> dict[str, torch.Tensor]:
    """The weights of a resolved source (its note, if any, printed once by rank 0)."""
    if source.note and dist.is_main():
        print(f"[livt] {source.note}", flush=True)
    if source.file is not None:
        if source.file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(source.file))
        obj = load_torch_file(source.file)
        return obj.get("model", obj) if isinstance(obj, dict) else obj
    with weights_only_loading(source.ckpt_dir / source.tag), held_output():  # zero_to_fp32 prints on every rank
        return consolidate(source.ckpt_dir, source.tag)


def weights_provenance(path: str | Path) -> dict[str, Any]:
    """Where the weights behind ``path`` (as ``load_weights`` resolves it) were trained: run folder, checkpoint
    tag and the sha256 of the recipe they were trained with, so a metrics.json can be traced to its weights."""
    source = resolve_model(path)
    resolved = str(Path(path).resolve())
    if source.config is not None:
        livt = json.loads(source.config.read_text()).get("livt", {})
        info = livt.get("provenance") or model_provenance(None, livt.get("tag"), livt.get("recipe"))
        return {**info, "weights": resolved}
    if source.file is not None:
        return {**model_provenance(None, None, None), "weights": resolved}
    return {**model_provenance(source.run_dir, source.tag, saved_recipe(source.ckpt_dir / source.tag)),
            "weights": resolved}


def checkpoint_config(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """timm hub config.json of the checkpoint ``ckpt_dir/tag``: model, loss and normalisation from the recipe that
    checkpoint was trained with (its own record, not the run's config.yaml, which a later launch may have
    rewritten), class names and counts from that recipe's shard set."""
    trained_with = checkpoint_recipe(ckpt_dir, tag)
    recipe = recipe_from_dict(trained_with)
    try:
        meta = recipe_meta(trained_with)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{ckpt_dir / tag}: the shard set it was trained on is needed once, to record the "
                              f"class names and counts: {exc}") from None
    mean, std = normalisation(recipe, meta)
    config = hub_config(recipe, checkpoint_stage(ckpt_dir, tag), meta["classes"],
                        train_class_counts(meta, recipe.data.train_split), mean, std, tag=tag)
    config["livt"]["recipe"] = trained_with  # as saved: its sha256 is the one the run's history records
    return config


def load_config_and_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hub config, timm state dict) of the weights at ``path`` (as `resolve_model` reads it: an export, a run or a
    checkpoint) from their own record; a checkpoint is consolidated on the fly."""
    source = resolve_model(path)
    if source.ckpt_dir is not None:
        config = checkpoint_config(source.ckpt_dir, source.tag)
        return config, model_weights(source_weights(source), config["livt"]["stage"])
    if source.file.suffix == ".safetensors":
        if source.config is None:
            raise CheckpointError(f"{source.file}: no {CONFIG_NAME} beside it; export with `livt export RUN`")
        return json.loads(source.config.read_text()), source_weights(source)
    payload = load_torch_file(source.file)
    if not isinstance(payload, dict) or not payload.get("class_names") or "recipe" not in payload:
        raise CheckpointError(f"{source.file}: not a livt export with class names; use the export folder "
                              "(config.json + model.safetensors) or re-export with `livt export RUN`")
    recipe = recipe_from_dict(payload["recipe"])
    mean, std = recipe.data.mean or payload.get("mean"), recipe.data.std or payload.get("std")
    if mean is None or std is None:
        raise CheckpointError(f"{source.file}: no normalisation recorded; use the export folder instead")
    config = hub_config(recipe, payload.get("stage") or "finetune", payload["class_names"],
                        payload["class_counts"], mean, std, tag=payload.get("tag"))
    return config, model_weights(payload["model"], config["livt"]["stage"])


def load_classifier(path: str | Path, config: dict[str, Any] | None = None,
                    device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The inference model of `livt eval` and `livt predict`: the classifier of the weights at ``path``, built by
    timm from ``config`` (a hub config.json; by default the weights' own record), its last LayerNorm and head in
    fp32 as in training, every weight loaded, in eval mode on ``device`` (the GPU when there is one).
    Returns (model, config)."""
    config, weights = load_config_and_weights(path) if config is None else (config, load_weights(path))
    if not config.get("num_classes"):
        raise CheckpointError(f"{path}: an MGP encoder (num_classes 0) has no classifier; use a BFT (finetune) "
                              "run or its export")
    model = fp32_head(build_timm_model(config))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit {config['architecture']} with "
                              f"{config.get('model_args')} and {config['num_classes']} classes (an MGP encoder, "
                              f"another model size or another set?): {str(exc)[:600]}") from None
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device).eval(), config


def initial_model(task: Task) -> nn.Module:
    """The task's model, started from the weights of ``model.init`` when a fine-tuning recipe names them."""
    init = task.recipe.model.init
    if not init or task.stage != "finetune":
        return task.build_model()
    return task.build_model(init=load_weights(init))


EXPORT_FILES = {"model.safetensors", "config.json", "model.pt", "encoder.pt"}


def export(run_dir: str | Path, output: str | Path | None = None, tag: str | None = None) -> list[Path]:
    """Write ``model.safetensors`` + ``config.json`` (timm's hub layout: the classifier, or the encoder of an MGP
    run) and ``model.pt`` (and ``encoder.pt`` for MGP): the consolidated fp32 weights with their record, in one file.

    Everything the export says (recipe, loss, classes, provenance) comes from the checkpoint it is made of. The
    files are written into a fresh folder that then replaces ``output`` whole, so an export never mixes the files
    of two checkpoints."""
    run_dir = Path(run_dir)
    output = Path(output) if output else run_dir / EXPORT
    other = sorted(p.name for p in output.iterdir() if p.name not in EXPORT_FILES) if output.is_dir() else []
    if other:
        raise CheckpointError(f"--output {output} holds files that are not an export's ({other[:4]}); an export "
                              "replaces its folder whole: choose a new or an export folder")
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to export (no 'latest'); has the run saved one?")
    config = checkpoint_config(ckpt_dir, tag)
    config["livt"]["provenance"] = model_provenance(run_dir, tag, config["livt"]["recipe"])
    with weights_only_loading(ckpt_dir / tag):
        state = consolidate(ckpt_dir, tag)
    stage = config["livt"]["stage"]
    fresh = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(fresh, ignore_errors=True)
    written = write_export(fresh, config, model_weights(state, stage))
    payload = {"recipe": config["livt"]["recipe"], "stage": stage, "tag": tag,
               "num_classes": len(config["livt"]["class_counts"]), "class_names": config.get("label_names"),
               "class_counts": config["livt"]["class_counts"], "mean": config["pretrained_cfg"]["mean"],
               "std": config["pretrained_cfg"]["std"], "provenance": config["livt"]["provenance"]}
    torch.save({**payload, "model": state}, fresh / "model.pt")
    written.append(fresh / "model.pt")
    if stage == "pretrain":
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        torch.save({**payload, "model": encoder}, fresh / "encoder.pt")
        written.append(fresh / "encoder.pt")
    _replace_folder(fresh, output)
    return [output / path.name for path in written]


def _replace_folder(fresh: Path, target: Path) -> None:
    """Put ``fresh`` where ``target`` is (an export folder, or absent)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        fresh.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        fresh.rename(target)
