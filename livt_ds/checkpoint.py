"""The run's checkpoints, in one place: when to save, what is saved, how it is written, pruned and restored.

Layout: ``RUN/checkpoints/<tag>/`` (tag ``stepNNNNNNNN``): the engine's ZeRO files (model, optimizer shards; their
client state holds the `TrainState`, each rank's RNG states and the resolved recipe), then ``train_state.json``,
written by rank 0 once every rank's files are complete; ``RUN/checkpoints/latest`` names the newest complete tag and
is replaced atomically after it. A run killed at any moment therefore leaves ``latest`` at a complete checkpoint;
a half-written tag folder is removed when that step is saved again.

- `plan_resume` decides, from the files alone (no DeepSpeed), what a launch resumes from and what differs from
  the checkpoint (recipe, schedule length, data stream): testable and cheap.
- `save_due` says when to save; `save` saves and prunes; `engine_config` converts for another world size;
  `restore` brings the engine and the `TrainState` back.
Plain weights (consolidation, ``model.init``, export) are in livt_ds/weights.py.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livt_ds import dist, provenance, universal
from livt_ds.config import CheckpointConfig, Recipe, recipe_from_dict, recipe_to_dict
from livt_ds.errors import CheckpointError, ConfigError, UnsafeWeightsError
from livt_ds.run_files import CHECKPOINTS, LATEST, STATE_FILE, write_json_atomic, write_text_atomic
from livt_ds.safe_load import load_torch_file, weights_only_loading
from livt_ds.seeding import rng_state, set_rng_state
from livt_ds.train_state import Schedule, TrainState

TAG_RE = re.compile(r"^step(\d{8})$")
SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # one ZeRO optimizer shard per rank


# ------------------------------------------------------------------------------------------------ layout
def step_tag(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{latest} names '{tag}', but {ckpt_dir / tag} is missing")
    return tag


def optimizer_shards(tag_dir: Path) -> list[str]:
    """The ZeRO optimizer shard files of a tag folder, one per data-parallel rank, sorted."""
    shards = sorted(glob.glob(str(tag_dir / "*_optim_states.pt")))
    if not shards:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer shards (*_optim_states.pt); "
                              "not a livt/DeepSpeed checkpoint")
    return shards


def saved_world_size(tag_dir: Path) -> int:
    """Data-parallel world size a ZeRO checkpoint was written with (one optimizer shard per rank)."""
    return len(optimizer_shards(tag_dir))


def is_complete(tag_dir: Path) -> bool:
    """A tag folder whose save finished on every rank: rank 0 writes its state file last."""
    return (tag_dir / STATE_FILE).is_file()


def find_checkpoint(path: Path) -> tuple[Path, str] | None:
    """The checkpoint a path names: a run folder or a checkpoint folder (its ``latest``), or a tag folder."""
    if (path / LATEST).is_file():
        return path, latest_tag(path)
    if (path / CHECKPOINTS / LATEST).is_file():
        return path / CHECKPOINTS, latest_tag(path / CHECKPOINTS)
    if path.is_dir() and glob.glob(str(path / "*model_states.pt")):
        return path.parent, path.name
    return None


# ------------------------------------------------------------------------------------------------ resume plan
@dataclass(frozen=True)
class ResumePlan:
    """What a launch resumes from: ``ckpt_dir/tag`` (step ``step``), written by ``saved_world`` ranks, loaded by
    ``world``; and what differs from the checkpoint: the recipe (``recipe_change``: key -> [old, new]), the length
    of the schedule (``schedule_change``) and the data stream (``stream_warnings``)."""

    ckpt_dir: Path
    tag: str
    saved_world: int
    world: int
    step: int = 0
    recipe_change: dict[str, list] | None = None
    schedule_change: dict[str, list] | None = None
    stream_warnings: tuple[str, ...] = ()

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def needs_universal(self) -> bool:
        """ZeRO shards are per rank: another world size loads DeepSpeed's universal form of the checkpoint."""
        return self.saved_world != self.world

    @property
    def load_tag(self) -> str:
        return f"{self.tag}_universal" if self.needs_universal else self.tag

    def messages(self) -> list[str]:
        """What a resumed launch tells the user first."""
        text = f"resumed from {self.tag_dir} at step {self.step}"
        if self.schedule_change:
            total, lr = self.schedule_change["total_steps"], self.schedule_change["lr_at_resume"]
            text += (f"; the schedule now ends at step {total[1]} (was {total[0]}): "
                     f"lr at step {self.step} {lr[0]:.3g} -> {lr[1]:.3g}")
        return [text, *self.stream_warnings]

def holds_checkpoints(run_dir: Path) -> bool:
    """True when the run folder has saved a checkpoint (complete or not)."""
    ckpt_dir = checkpoint_dir(run_dir)
    return ckpt_dir.is_dir() and any(p.name == LATEST or TAG_RE.match(p.name) for p in ckpt_dir.iterdir())


def plan_resume(run_dir: Path, resume: str, world: int, *, overwrite: bool = False, recipe: Recipe | None = None,
                schedule: Schedule | None = None, allow_recipe_change: bool = False,
                data_sha256: str | None = None) -> ResumePlan | None:
    """``auto``: the run's ``latest`` if any (else a fresh start); ``none``: a fresh start, in a folder without
    checkpoints unless ``overwrite`` (the caller then clears it); a path: that run folder, checkpoint folder or tag
    folder, which must hold a complete checkpoint. Reads files only.

    With the launch's ``recipe`` and ``schedule``, the plan also holds what differs from the checkpoint; a recipe
    change that alters what is trained raises ConfigError unless ``allow_recipe_change``, and so does one that would
    train no step (it would only relabel the checkpoint's weights). ``data_sha256``: the digest of the launch's
    meta.json (another copy of the same shard set is no change)."""
    if resume == "none":
        if not overwrite and holds_checkpoints(run_dir):
            raise CheckpointError(
                f"--resume none: {run_dir} holds checkpoints of an earlier run; a fresh start there would mix the "
                "two runs' checkpoints. Use another --output, --resume auto to continue it, or --overwrite to "
                "delete its checkpoints, export, metrics and logs first (history.jsonl is kept)")
        return None
    if resume == "auto":
        ckpt_dir = checkpoint_dir(run_dir)
        tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        found = (ckpt_dir, tag) if tag else None
    else:
        found = find_checkpoint(Path(resume))
        if found is None:
            raise CheckpointError(f"--resume {resume}: neither a run folder, a checkpoint folder with 'latest', "
                                  "nor a tag folder")
    if found is None:
        return None
    ckpt_dir, tag = found
    if not is_complete(ckpt_dir / tag):
        raise CheckpointError(f"{ckpt_dir / tag} is incomplete (no {STATE_FILE}: its save was interrupted); "
                              f"resume from {ckpt_dir} ('latest') instead")
    plan = ResumePlan(ckpt_dir, tag, saved_world_size(ckpt_dir / tag), world)
    if recipe is None or schedule is None:
        return plan
    state, saved = saved_state(plan.tag_dir), saved_recipe(plan.tag_dir)
    diff = None
    if saved is not None:
        new, digests = recipe_to_dict(recipe), (state.data_sha256, data_sha256)
        diff = provenance.check_resume_recipe(saved, new, allow=allow_recipe_change, checkpoint=str(plan.tag_dir),
                                              output=str(run_dir), data_sha256=digests)
        stop = recipe.train.stop_after_steps
        end = schedule.total_steps if stop is None else min(schedule.total_steps, stop)
        provenance.refuse_change_that_trains_nothing(saved, new, diff, digests, state.step, end, str(plan.tag_dir))
    return dataclasses.replace(plan, step=state.step, recipe_change=diff,
                               schedule_change=schedule_change(saved, diff, schedule, state.step),
                               stream_warnings=stream_warnings(state, schedule, recipe, world))


def schedule_change(saved: dict[str, Any] | None, diff: dict[str, list] | None, schedule: Schedule,
                    step: int) -> dict[str, list] | None:
    """A resume with another length (allowed on purpose) follows, from its first step on, the warm-up + cosine of
    a run planned with the new length from the start: the lr stays a pure function of the step."""
    if not saved or not diff:
        return None
    try:
        before = schedule.replan(recipe_from_dict(saved))
    except ConfigError:  # a recipe this version cannot read: nothing to compare
        return None
    if before.total_steps == schedule.total_steps:
        return None
    return {"total_steps": [before.total_steps, schedule.total_steps], "lr_at_resume": [before.lr(step),
                                                                                          schedule.lr(step)]}


# ------------------------------------------------------------------------------------------------ one decision
SHARED_MARK = ".all_ranks_see_this"  # written by rank 0 in the run folder while the ranks agree on the resume


def agree_on_resume(run_dir: str | Path, resume: str, world: int, **checks: Any) -> ResumePlan | None:
    """The launch's one resume decision (a collective: every rank calls it, every rank gets the same answer).

    Rank 0 makes the plan (`plan_resume`, given ``checks``: the launch's recipe and schedule) and shares it, with a
    token it writes into the run folder; an error of the plan is raised on every rank. Every rank then checks that it
    reads the token (the nodes share the output folder) and the files the plan names for it (the model states and its
    own ZeRO shard, or the universal folder). If any rank cannot, every rank raises the same `CheckpointError` naming
    the rank, its host and the folder that must be shared: never a hang on a collective that only some ranks reach,
    never ranks resuming from different steps.
    """
    run_dir = Path(run_dir)

    def decide() -> tuple[ResumePlan | None, str, str, str]:
        plan, token = plan_resume(run_dir, resume, world, **checks), uuid.uuid4().hex
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / SHARED_MARK, token)
        return plan, token, str(run_dir.resolve()), socket.gethostname()

    plan, token, main_dir, main_host = dist.on_main(decide)
    problems = gather_problems(unreadable_on_this_rank(run_dir, token, plan, dist.rank()), run_dir)
    if dist.is_main():
        (run_dir / SHARED_MARK).unlink(missing_ok=True)
    if problems:
        raise CheckpointError(not_shared_message(problems, main_dir, main_host, "resume"))
    return plan


def unreadable_on_this_rank(run_dir: Path, token: str, plan: ResumePlan | None, rank: int) -> str | None:
    """What this rank cannot read of the run folder and of ``plan``'s checkpoint (None: everything it needs)."""
    mark = run_dir / SHARED_MARK
    try:
        if mark.read_text() != token:
            return f"{mark} holds another launch's token"
    except OSError:
        return f"{mark}, written by rank 0, is not there"
    if plan is None:
        return None
    universal = plan.ckpt_dir / f"{plan.tag}_universal"
    if plan.needs_universal and universal.is_dir():  # converted earlier: this rank loads from it
        needed = [universal / "zero", *glob.glob(str(universal / "*mp_rank_00_model_states.pt"))[:1]]
        if len(needed) < 2 or not needed[0].is_dir():
            return f"{universal} (the universal checkpoint) is incomplete or unreadable"
        return None
    needed = glob.glob(str(plan.tag_dir / "*mp_rank_00_model_states.pt"))[:1]
    if not plan.needs_universal:  # its own optimizer shard, as this rank wrote it
        needed += glob.glob(str(plan.tag_dir / f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))[:1]
    if len(needed) < (1 if plan.needs_universal else 2):
        what = "model states" if plan.needs_universal else f"model states or rank {rank}'s ZeRO optimizer shard"
        return f"{plan.tag_dir} lacks the {what}"
    for path in needed:
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError as exc:
            return f"{path}: {exc.strerror}"
    return None


def gather_problems(problem: str | None, folder: Path) -> list[tuple[int, str, str, str]]:
    """Every rank's ``problem`` as (rank, host, ``folder`` as that rank sees it, problem), a collective; empty when
    no rank has one."""
    found = dist.gather_objects(problem and (dist.rank(), socket.gethostname(), str(folder.resolve()), problem))
    return [p for p in found if p]


def not_shared_message(problems: list[tuple[int, str, str, str]], main_dir: str, main_host: str, when: str) -> str:
    """One message for every rank: which ranks (rank, host, the folder as they see it) miss what rank 0 wrote."""
    shown = "; ".join(f"rank {rank} on {host} ({folder}): {what}" for rank, host, folder, what in problems[:4])
    more = f"; and {len(problems) - 4} more ranks" if len(problems) > 4 else ""
    return (f"{len(problems)} rank(s) cannot read what rank 0 on {main_host} wrote in {main_dir} at {when}: "
            f"{shown}{more}. Every node must see the same output folder: put --output on a filesystem all nodes "
            "share (an absolute path there), or copy the checkpoints to each node before a resume.")


def check_every_rank_saved(tag_dir: Path, world: int) -> None:
    """After a save (a collective): every rank sees every rank's optimizer shard in ``tag_dir``, so a checkpoint split
    over nodes that do not share the output folder is refused before it is marked complete."""
    try:
        names = os.listdir(tag_dir)  # one listing per rank, not one per file: cheap on a parallel filesystem
    except OSError:
        names = []
    seen = {int(m.group(1)) for m in map(SHARD_RE.search, names) if m}
    missing: list = [r for r in range(world) if r not in seen]
    if not any(name.endswith("mp_rank_00_model_states.pt") for name in names):
        missing.append("the model states")
    problem = f"sees no files of rank(s) {', '.join(map(str, missing))}" if missing else None
    problems = gather_problems(problem, tag_dir)
    if problems:
        main = dist.broadcast_object((str(tag_dir.resolve()), socket.gethostname()))
        raise CheckpointError(not_shared_message(problems, main[0], main[1], f"the save of {tag_dir.name}"))


def stream_warnings(state: TrainState, schedule: Schedule, recipe: Recipe, world: int) -> tuple[str, ...]:
    """A warning when the data stream from the resume step on is not the one the checkpoint's run would have read."""
    now = schedule.stream_position(state.step, seed=recipe.train.seed, rank=0, world=world,
                                   workers=recipe.data.num_workers).without_rank()
    changed = {k: [state.stream[k], now[k]] for k in state.stream
               if k in now and state.stream[k] != now[k] and k != "batches"}
    if not changed:
        return ()
    return (f"the data stream differs from the checkpoint's ({changed}): the batches from here on are not those of "
            "an uninterrupted run (keep data.num_workers and the world size to resume exactly)",)


# ------------------------------------------------------------------------------------------------ save, restore
def save_due(config: CheckpointConfig, step: int, *, evaluated: bool, final: bool) -> bool:
    """Save after an evaluation (so the best model has a checkpoint), every ``checkpoint.every_steps``, and at the
    last step of a launch (the end, ``stop_after_steps``, SIGTERM)."""
    every = config.every_steps
    return final or evaluated or bool(every and step % every == 0)


def save(engine, state: TrainState, run_dir: Path, *, keep_last: int, recipe: dict[str, Any]) -> str:
    """Save ``state.step`` on every rank (a collective), mark it complete, point ``latest`` at it, prune."""
    ckpt_dir, tag = checkpoint_dir(run_dir), step_tag(state.step)
    state.last_saved = state.step
    if dist.is_main() and (ckpt_dir / tag).is_dir():  # left incomplete by a run killed while saving it
        shutil.rmtree(ckpt_dir / tag)
    dist.barrier()
    client = {"train_state": state.to_dict(), "rng": dist.gather_objects(rng_state()), "recipe": recipe}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    dist.barrier()  # every rank's files are written: only now is the tag complete
    check_every_rank_saved(ckpt_dir / tag, dist.world_size())
    if dist.is_main():
        write_json_atomic(ckpt_dir / tag / STATE_FILE, state.to_dict())
        write_text_atomic(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep_last, keep={tag, state.best.tag if state.best else tag})
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, keep: set[str]) -> None:
    """Keep the newest ``keep_last`` tags and those in ``keep`` (latest, best); drop the rest."""
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for old in tags[:-keep_last]:
        if old not in keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{old}_universal", ignore_errors=True)


def engine_config(plan: ResumePlan | None, ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config the engine is built with: ``ds_config``, told to load the universal form when the world
    size changed (converted here, once; a collective). ``ds_config`` itself is left as the user's."""
    if plan is None or not plan.needs_universal:
        return ds_config
    to_universal(plan.ckpt_dir, plan.tag)
    config = copy.deepcopy(ds_config)
    config.setdefault("checkpoint", {})["load_universal"] = True
    return config


def restore(engine, plan: ResumePlan, stage: str) -> TrainState:
    """Weights, optimizer, training state and this rank's RNG states of ``plan``'s checkpoint."""
    check_model_matches(engine.module, plan.tag_dir)
    client = _load_engine(engine, plan.ckpt_dir, plan.load_tag)
    state = TrainState.from_dict(client.get("train_state", {}), str(plan.tag_dir))
    if state.stage != stage:
        raise CheckpointError(f"{plan.tag_dir} is a '{state.stage}' checkpoint, not '{stage}'")
    rng = client.get("rng") or []
    if len(rng) == dist.world_size():  # the same world: each rank continues its own random streams
        set_rng_state(rng[dist.rank()])
    return state


# ------------------------------------------------------------------------------------------------ reading
def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert ``ckpt_dir/tag`` to DeepSpeed's universal format (once, on rank 0); return the new tag.

    The conversion runs DeepSpeed's ds_to_universal in a subprocess that reads every file weights-only
    (livt_ds/universal.py): a file that would need arbitrary Python objects is refused (UnsafeWeightsError, on every
    rank) before any of it is unpickled. A collective when a process group is up: every rank must call it; a failure
    on rank 0 raises on every rank."""
    uni_tag = f"{tag}_universal"

    def convert() -> None:
        if (ckpt_dir / uni_tag).is_dir():
            return
        tmp = ckpt_dir / f"{uni_tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"[livt] converting {ckpt_dir / tag} to a universal checkpoint ...", flush=True)
        result = subprocess.run(universal.command(ckpt_dir / tag, tmp), capture_output=True, text=True,
                                env=universal.environment())
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # it names the .tmp folder; nothing reads it
        if result.returncode == universal.EXIT_REFUSED:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UnsafeWeightsError(result.stderr.strip().splitlines()[-1])
        if result.returncode != 0:
            raise CheckpointError(f"universal conversion of {ckpt_dir / tag} failed:\n{result.stderr[-3000:]}")
        tmp.rename(ckpt_dir / uni_tag)

    dist.on_main(convert)
    return uni_tag

def model_states(tag_dir: Path) -> dict[str, Any]:
    """The rank-0 ``*model_states.pt`` of a tag folder: param_shapes, buffer_names, the module state dict."""
    files = sorted(glob.glob(str(tag_dir / "*mp_rank_00_model_states.pt")))
    if not files:
        raise CheckpointError(f"{tag_dir}: no *model_states.pt; not a livt/DeepSpeed checkpoint")
    return load_torch_file(files[0])


def saved_param_shapes(states: dict[str, Any]) -> dict[str, tuple]:
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
    ``model``'s, or that lacks one of its persistent buffers (the MAE's fixed sin-cos tables)."""
    states = model_states(tag_dir)
    saved = saved_param_shapes(states)
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


def saved_state(tag_dir: Path) -> TrainState:
    """The training state a complete checkpoint holds (its ``train_state.json``), read without DeepSpeed."""
    path = tag_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); resume from another checkpoint") from None
    return TrainState.from_dict(data, str(tag_dir))


def saved_recipe(tag_dir: Path) -> dict[str, Any] | None:
    """The resolved recipe a checkpoint was trained with (its client state), None for a checkpoint without one."""
    recipe = model_states(tag_dir).get("recipe")
    return recipe if isinstance(recipe, dict) else None



def _load_engine(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load model, optimizer and client state; the checkpoint must exist (DeepSpeed only warns otherwise)."""
    try:
        with weights_only_loading(ckpt_dir / tag):  # DeepSpeed's loader unpickles with weights_only=False
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
    except UnsafeWeightsError:
        raise
    except (RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{ckpt_dir / tag} does not match the model being trained "
                              f"(another model size or stage?): {str(exc)[:800]}") from exc
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    return client or {}
