"""Which weights a model path means, and what those weights say about their own training.

`resolve_model` turns what a user gives as ``model.init``, ``--model`` or ``livt eval``'s model into one source: an
export file (with the ``config.json`` beside it, when there is one) or a checkpoint (folder and tag). A run folder
means its ``export/`` only while that export is of the run's latest checkpoint: once training has saved a newer
one, the export is stale and the latest checkpoint is used instead (with a note saying so).

`model_record` reads the facts of the weights' training: stage, loss (name, tau, test prior), class names and
counts, the recipe and its provenance. They come from the weights' own record: an export's ``config.json``, a
``.pt`` export's payload, or a checkpoint's saved recipe (its client state) and that recipe's shard set. Never from
the command line's recipe or the run's ``config.yaml``, which may describe something else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livt_ds.checkpoint import find_checkpoint, saved_recipe, saved_state
from livt_ds.config import LossConfig, Recipe, recipe_from_dict
from livt_ds.data.remote import RemoteOptions
from livt_ds.data.shards import load_meta, train_class_counts
from livt_ds.errors import CheckpointError, ConfigError
from livt_ds.run_files import CHECKPOINTS, EXPORT, LATEST
from livt_ds.safe_load import load_torch_file

WEIGHT_FILES = ("model.safetensors", "model.pt")  # in an export folder, the first found wins
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModelSource:
    """An export file (``file``, ``config`` its config.json or None) or a checkpoint (``ckpt_dir``/``tag``)."""

    path: Path  # what the user gave
    file: Path | None = None
    config: Path | None = None
    ckpt_dir: Path | None = None
    tag: str | None = None
    note: str | None = None  # said to the user when the source is not the obvious one (a stale export skipped)

    @property
    def run_dir(self) -> Path | None:
        """The run folder of a checkpoint source (None for exports and loose checkpoint folders)."""
        if self.ckpt_dir is not None and self.ckpt_dir.name == CHECKPOINTS:
            return self.ckpt_dir.parent
        return None


@dataclass(frozen=True)
class ModelRecord:
    """How the weights were trained, as recorded with them."""

    stage: str
    loss: dict[str, Any]  # {"name", "tau", "test_prior"}
    class_names: list[str] | None
    class_counts: list[int] | None
    recipe: dict[str, Any] | None
    source: str  # where the record was read, for messages


def _step(tag: str | None) -> int:
    digits = "".join(ch for ch in (tag or "") if ch.isdigit())
    return int(digits) if digits else -1


def _export_file(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def _export_source(path: Path, file: Path, note: str | None = None) -> ModelSource:
    config = file.parent / CONFIG_NAME
    return ModelSource(path, file=file, config=config if config.is_file() else None, note=note)


def _stale_export_note(run: Path, export_file: Path, ckpt_dir: Path, tag: str) -> str | None:
    """A note when ``export_file`` is older than the run's latest checkpoint ``tag``; None when it is that one."""
    config = export_file.parent / CONFIG_NAME
    exported = json.loads(config.read_text()).get("livt", {}).get("tag") if config.is_file() else None
    if exported is not None:
        if exported == tag or _step(exported) > _step(tag):
            return None
    elif export_file.stat().st_mtime >= (ckpt_dir / LATEST).stat().st_mtime:
        return None
    return (f"{run / 'export'} is of {exported or 'an older checkpoint'}, older than the run's latest checkpoint "
            f"{tag}: using {ckpt_dir / tag} (run `livt export {run}` to refresh the export)")


def resolve_model(path: str | Path) -> ModelSource:
    """The weights ``path`` names: an export file, an export folder, a run folder (its export while it is current,
    else its latest checkpoint), a checkpoint folder with ``latest``, or a tag folder."""
    path = Path(path)
    if path.is_file():
        return _export_source(path, path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not found (expected an export (model.safetensors or .pt), a run folder, "
                              "or a checkpoint)")
    own = _export_file(path)
    if own is not None:  # an export folder
        return _export_source(path, own)
    found = find_checkpoint(path)
    export = _export_file(path / EXPORT)
    if export is not None:
        if found is None or found[0] != path / CHECKPOINTS:
            return _export_source(path, export)
        note = _stale_export_note(path, export, *found)
        if note is None:
            return _export_source(path, export)
        return ModelSource(path, ckpt_dir=found[0], tag=found[1], note=note)
    if found is None:
        raise CheckpointError(f"{path}: not an export (model.safetensors or .pt), a run folder or a checkpoint")
    return ModelSource(path, ckpt_dir=found[0], tag=found[1])


def checkpoint_recipe(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """The recipe a checkpoint was trained with (saved in its client state)."""
    recipe = saved_recipe(ckpt_dir / tag)
    if recipe is None:
        raise CheckpointError(f"{ckpt_dir / tag}: no recipe saved with the checkpoint; it was not written by "
                              "livt pretrain / finetune")
    return recipe


def checkpoint_stage(ckpt_dir: Path, tag: str) -> str:
    """``pretrain`` or ``finetune``: the stage the checkpoint's training state records."""
    return saved_state(ckpt_dir / tag).stage


def _loss(recipe: dict[str, Any] | None) -> dict[str, Any]:
    loss = recipe_from_dict(recipe).loss
    return {"name": loss.name, "tau": loss.tau, "test_prior": loss.test_prior}


def recipe_meta(recipe: dict[str, Any], fallback_meta: dict | None = None) -> dict:
    """The meta.json of the shard set a recipe trained on (``fallback_meta`` when that set cannot be read)."""
    data = recipe_from_dict(recipe).data
    try:
        return load_meta(data.path, RemoteOptions.from_config(data))
    except (FileNotFoundError, OSError):
        if fallback_meta is None:
            raise
        return fallback_meta


def model_record(source: ModelSource, fallback_meta: dict | None = None) -> ModelRecord | None:
    """What the weights of ``source`` record about their training (None for a bare file without a record).

    A checkpoint's class names and counts come from the shard set of its own recipe; ``fallback_meta`` (the shard
    set being evaluated) stands in when that set cannot be read."""
    if source.config is not None:
        config = json.loads(source.config.read_text())
        livt = config.get("livt", {})
        return ModelRecord(livt.get("stage") or "finetune", dict(livt.get("loss") or _loss(livt.get("recipe"))),
                           config.get("label_names"), livt.get("class_counts"), livt.get("recipe"), str(source.config))
    if source.file is not None:
        if source.file.suffix == ".safetensors":
            return None
        payload = load_torch_file(source.file)
        if not isinstance(payload, dict) or not isinstance(payload.get("recipe"), dict):
            return None
        return ModelRecord(payload.get("stage") or "finetune", _loss(payload["recipe"]), payload.get("class_names"),
                           payload.get("class_counts"), payload["recipe"], str(source.file))
    recipe = checkpoint_recipe(source.ckpt_dir, source.tag)
    meta = recipe_meta(recipe, fallback_meta)
    counts = train_class_counts(meta, recipe_from_dict(recipe).data.train_split)
    return ModelRecord(checkpoint_stage(source.ckpt_dir, source.tag), _loss(recipe), list(meta["classes"]),
                       counts, recipe, str(source.ckpt_dir / source.tag))


def follow_record(recipe: Recipe, record: ModelRecord | None, meta: dict,
                  model: str) -> tuple[Recipe, dict[str, Any] | None, list[int] | None, list[str]]:
    """What `livt eval` adjusts test priors with: ``recipe`` with the loss the model was trained with, the recipe
    dict the adjustment follows (the model's: its loss keys and epochs), the model's training class counts, and
    notes for the user. The command line's loss never relabels a model: a different one is ignored, with a note.
    A model of other classes than the evaluated shard set's is refused."""
    if record is None:
        return recipe, None, None, [f"model.init={model} carries no record of its training (a .safetensors without "
                                    f"config.json): the test-prior adjustment uses --config's loss {recipe.loss.name}"]
    names = [str(n) for n in meta.get("classes", [])]
    if record.class_names is not None and [str(n) for n in record.class_names] != names:
        raise ConfigError(f"model.init={model} was trained on other classes than {recipe.data.path} holds "
                          f"({list(record.class_names)[:4]}... vs {names[:4]}...): evaluate it on its own data set")
    if record.recipe is not None:
        trained, trained_with = recipe_from_dict(record.recipe).loss, record.recipe
    else:
        known = {f.name for f in dataclasses.fields(LossConfig)}
        trained = LossConfig(**{k: v for k, v in record.loss.items() if k in known})
        trained_with = {"loss": dataclasses.asdict(trained)}
    notes = []
    if trained != recipe.loss:
        notes.append(f"the model was trained with loss {_describe(trained)} ({record.source}); --config's loss "
                     f"{_describe(recipe.loss)} is ignored: the test-prior adjustment follows the model")
    counts = [int(c) for c in record.class_counts] if record.class_counts else None
    if counts is not None and counts != train_class_counts(meta, recipe.data.train_split):
        notes.append(f"the model's training class counts ({record.source}) differ from {recipe.data.path}'s "
                     f"{recipe.data.train_split} split: the shot groups and test priors use the model's")
    return dataclasses.replace(recipe, loss=trained), trained_with, counts, notes


def _describe(loss) -> str:
    prior = "" if loss.test_prior is None else ", test_prior set"
    return f"{loss.name} (tau {loss.tau}{prior})"
