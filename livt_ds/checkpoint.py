"""Checkpoints through the DeepSpeed engine, resume (also onto another world size), and plain-weight export.

Layout: ``RUN/checkpoints/<tag>/`` (engine-written ZeRO shards, tag ``stepNNNNNNNN``), ``RUN/checkpoints/latest``.
Exports: ``model.safetensors`` + ``config.json`` in timm's hub layout (livt_ds/hub.py), and ``model.pt``
``{"model": fp32 state dict, "recipe": dict, "stage": str, "tag": str, ...}`` (plain data, loads with
``weights_only=True``). Weights are read without unpickling arbitrary objects (livt_ds/safe_load.py).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from livt_ds import dist

TAG_RE = re.compile(r"^step(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{latest} names '{tag}', but {ckpt_dir / tag} is missing")
    return tag


def saved_world_size(tag_dir: Path) -> int:
    """Data-parallel world size a ZeRO checkpoint was written with (one optimizer shard per rank)."""
    shards = glob.glob(str(tag_dir / "*zero_pp_rank_*_optim_states.pt"))
    if not shards:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer shards (*_optim_states.pt); "
                              "not a livt/DeepSpeed checkpoint")
    return len(shards)


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int, keep: set[str] = ()) -> str:
    """Save on every rank (a collective), then prune old tags on rank 0, never the ones in ``keep``."""
    tag = step_tag(step)
    ckpt_dir = checkpoint_dir(run_dir)
    if dist.is_main() and (ckpt_dir / tag).is_dir():  # left incomplete by a run killed while saving it
        shutil.rmtree(ckpt_dir / tag)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's files are written: only now may 'latest' name the tag
    if dist.is_main():
        write_text_atomic(ckpt_dir / "latest", tag)
    if dist.is_main() and keep_last > 0:
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        for old in tags[:-keep_last]:
            if old not in keep and old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
                shutil.rmtree(ckpt_dir / f"{old}_universal", ignore_errors=True)
    dist.barrier()
    return tag


def write_text_atomic(path: Path, text: str) -> None:
    """A reader (or a process killed at any moment) sees the old or the new content, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert ``ckpt_dir/tag`` to DeepSpeed's universal format (once, on rank 0); return the new tag.

    A collective when a process group is up: every rank must call it; a failure on rank 0 raises on every rank."""
    uni_tag = f"{tag}_universal"
    error = None
    if dist.is_main() and not (ckpt_dir / uni_tag).is_dir():
        tmp = ckpt_dir / f"{uni_tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        print(f"[livt] converting {ckpt_dir / tag} to a universal checkpoint ...", flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            error = f"universal conversion of {ckpt_dir / tag} failed:\n{result.stderr[-3000:]}"
        else:
            tmp.rename(ckpt_dir / uni_tag)
            (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # it names the .tmp folder; nothing reads it
    error = dist.broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return uni_tag


def find_resume(run_dir: Path, resume: str) -> tuple[Path, str] | None:
    """``auto``: the run's ``latest`` if any; ``none``: fresh start; a path: that checkpoint folder or tag folder."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpt_dir = checkpoint_dir(run_dir)
        tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, latest_tag(path)
    if (path / "checkpoints" / "latest").is_file():
        return path / "checkpoints", latest_tag(path / "checkpoints")
    if path.is_dir() and glob.glob(str(path / "*model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(f"--resume {resume}: neither a run folder, a checkpoint folder with 'latest', "
                          "nor a tag folder")


def _model_states(tag_dir: Path) -> dict[str, Any]:
    """The rank-0 ``*model_states.pt`` of a tag folder: param_shapes, buffer_names, the module state dict."""
    files = sorted(glob.glob(str(tag_dir / "*mp_rank_00_model_states.pt")))
    if not files:
        raise CheckpointError(f"{tag_dir}: no *model_states.pt; not a livt/DeepSpeed checkpoint")
    from livt_ds.safe_load import load_torch_file

    return load_torch_file(files[0])


def _saved_param_shapes(states: dict[str, Any]) -> dict[str, tuple]:
    saved: dict[str, tuple] = {}
    for group in [*states.get("param_shapes", []), states.get("frozen_param_shapes") or {}]:
        saved.update({name: tuple(shape) for name, shape in group.items()})
    return saved


def persistent_buffer_names(model: torch.nn.Module) -> set[str]:
    """Buffers that are part of the state dict (fixed tables such as the MAE's sin-cos ``pos_embed``)."""
    params = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_buffers() if name not in params and name in model.state_dict()}


def check_model_matches(model: torch.nn.Module, tag_dir: Path) -> None:
    """Refuse, before DeepSpeed tries, a checkpoint whose parameter names/shapes or buffers differ from
    ``model``'s (a checkpoint that lacks a buffer, e.g. one made when the fixed tables were frozen parameters)."""
    states = _model_states(tag_dir)
    saved = _saved_param_shapes(states)
    current = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    problems = [f"{n}: {list(saved[n])} in the checkpoint, {list(current[n])} here"
                for n in current if n in saved and saved[n] != current[n]]
    problems += [f"{n}: only in the checkpoint" for n in saved if n not in current]
    problems += [f"{n}: not in the checkpoint" for n in current if n not in saved]
    saved_buffers = set(states.get("buffer_names") or [])
    problems += [f"buffer {n}: not in the checkpoint" for n in sorted(persistent_buffer_names(model) - saved_buffers)]
    if problems:
        raise CheckpointError(f"{tag_dir} does not match the model being trained (another model size or stage?): "
                              + "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else ""))


def saved_recipe(tag_dir: Path) -> dict[str, Any] | None:
    """The resolved recipe a checkpoint was trained with (its client state), None for a checkpoint without one."""
    recipe = _model_states(tag_dir).get("recipe")
    return recipe if isinstance(recipe, dict) else None


def load(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load model, optimizer and client state; the checkpoint must exist (DeepSpeed only warns otherwise)."""
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
    except (RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{ckpt_dir / tag} does not match the model being trained "
                              f"(another model size or stage?): {str(exc)[:800]}") from exc
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    return client or {}


# ------------------------------------------------------------------------------------------- plain weights


def written_by_bf16_optimizer(tag_dir: Path) -> bool:
    """True for a checkpoint of DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16 + fp32 gradient accumulation): its
    optimizer state has no ``zero_stage``, so DeepSpeed's zero_to_fp32 cannot read it."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    files = sorted(glob.glob(str(tag_dir / "*_optim_states.pt")))
    if not files:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer shards (*_optim_states.pt); "
                              "not a livt/DeepSpeed checkpoint")
    optim = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)[OPTIMIZER_STATE_DICT]
    return ZERO_STAGE not in optim


def universal_state_dict(uni_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 parameters from a universal checkpoint folder (``zero/<name>/fp32.pt``, flat or shaped, bare or as
    ``{"param": tensor}``) reshaped to the recorded shapes, plus the buffers of its model states file."""
    states = _model_states(uni_dir)
    out: dict[str, torch.Tensor] = {}
    for name, shape in _saved_param_shapes(states).items():
        path = uni_dir / "zero" / name / "fp32.pt"
        if not path.is_file():
            raise CheckpointError(f"{uni_dir}: {path.relative_to(uni_dir)} missing; the universal conversion is "
                                  f"incomplete (delete {uni_dir} to redo it)")
        saved = torch.load(path, map_location="cpu", weights_only=False)
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
    lost = sorted(set(_model_states(tag_dir).get("module") or {}) - set(state))
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
    found = find_resume(path, str(path)) if path.is_dir() else None
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
    found = find_resume(path, str(path))
    if found is None:
        raise CheckpointError(f"{path}: not a run folder, checkpoint or export")
    ckpt_dir, tag = found
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else None
    return {**model_provenance(run_dir, tag, saved_recipe(ckpt_dir / tag)), "weights": str(path.resolve())}


def run_export_config(run_dir: Path, tag: str) -> dict[str, Any]:
    """timm hub config.json of a run: model from its recipe, class names and counts from its shard set."""
    from livt_ds.config import recipe_from_dict
    from livt_ds.data.shards import load_meta
    from livt_ds.hub import hub_config
    from livt_ds.tasks import normalisation, train_class_counts

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


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
