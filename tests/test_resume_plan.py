"""What a resume plan knows before any engine exists: the recipe diff, the change of the schedule's length and
of the data stream; TrainState as the one owner of step, stream position, best evaluation and skipped counts;
a decision made on rank 0 reaches every rank, and so does its error."""

from __future__ import annotations

import json

import pytest
import torch

from livt_ds import dist
from livt_ds.checkpoint import plan_resume, step_tag
from livt_ds.config import load_recipe, recipe_to_dict
from livt_ds.data.pipeline import StreamPosition
from livt_ds.errors import ConfigError, RunLockedError
from livt_ds.run_files import LATEST, STATE_FILE
from livt_ds.train_state import Schedule, TrainState

SAMPLES = 80  # batch 8: 10 steps per epoch


def recipe(*overrides: str):
    return load_recipe("tiny_bft.yaml", ["data.path=shards/toy", "train.batch_size=8", "train.epochs=2",
                                         "train.warmup_epochs=1", *overrides])


def schedule(r) -> Schedule:
    plan = {"train_batch_size": 8, "gradient_accumulation_steps": 2, "optimizer": {"params": {"lr": 0.01}}}
    return Schedule.plan(r, plan, SAMPLES)


def saved_run(tmp_path, trained, step: int, workers: int | None = None):
    """A run folder whose latest checkpoint (step ``step``) was trained with recipe ``trained``: the files
    plan_resume reads (the model states hold the recipe, as the engine's client state does)."""
    run = tmp_path / "run"
    tag = run / "checkpoints" / step_tag(step)
    tag.mkdir(parents=True)
    torch.save({"recipe": recipe_to_dict(trained), "module": {}}, tag / "mp_rank_00_model_states.pt")
    for r in range(2):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    r = trained if workers is None else load_recipe(None, [f"data.num_workers={workers}"])
    stream = schedule(trained).stream_position(step, seed=trained.train.seed, rank=0, world=2,
                                               workers=r.data.num_workers)
    state = TrainState("finetune", step=step, stream=stream.without_rank())
    (tag / STATE_FILE).write_text(json.dumps(state.to_dict()))
    (run / "checkpoints" / LATEST).write_text(step_tag(step))
    return run


def test_an_unchanged_recipe_resumes_quietly(tmp_path):
    r = recipe()
    plan = plan_resume(saved_run(tmp_path, r, 13), "auto", 2, recipe=r, schedule=schedule(r))
    assert (plan.step, plan.recipe_change, plan.schedule_change, plan.stream_warnings) == (13, {}, None, ())
    assert plan.messages() == [f"resumed from {plan.tag_dir} at step 13"]


def test_a_longer_run_follows_the_schedule_planned_for_its_new_length(tmp_path):
    old, new = recipe(), recipe("train.epochs=3")
    run = saved_run(tmp_path, old, 13)
    with pytest.raises(ConfigError, match="train.epochs"):
        plan_resume(run, "auto", 2, recipe=new, schedule=schedule(new))
    plan = plan_resume(run, "auto", 2, recipe=new, schedule=schedule(new), allow_recipe_change=True)
    assert plan.recipe_change == {"train.epochs": [2, 3]}
    lr_before, lr_after = schedule(old).lr(13), schedule(new).lr(13)
    assert lr_before != lr_after
    assert plan.schedule_change == {"total_steps": [20, 30], "lr_at_resume": [lr_before, lr_after]}
    assert "the schedule now ends at step 30 (was 20)" in plan.messages()[0]


def test_a_stream_that_changes_is_named(tmp_path):
    r = recipe("data.num_workers=2")
    plan = plan_resume(saved_run(tmp_path, r, 13, workers=1), "auto", 2, recipe=r, schedule=schedule(r))
    assert len(plan.stream_warnings) == 1 and "'workers': [1, 2]" in plan.stream_warnings[0]
    assert plan.messages()[1] == plan.stream_warnings[0]


def test_train_state_owns_step_stream_best_and_skipped_counts():
    state = TrainState("finetune", step=4, skipped={"samples": 5, "shards": 1})  # as restored from a checkpoint
    state.advance(StreamPosition(seed=0, epoch=1, rank=1, world=2, workers=2, batches=10, skip=0))
    assert state.step == 5 and state.stream == {"seed": 0, "epoch": 1, "world": 2, "workers": 2, "batches": 10,
                                                "skip": 0}
    assert state.count_skipped({"samples": 2, "shards": 0}) == {"samples": 7, "shards": 1}
    assert state.count_skipped({"samples": 3, "shards": 2}) == {"samples": 8, "shards": 3}  # this launch's totals
    assert state.count_skipped({"samples": 3, "shards": 2}) == {"samples": 8, "shards": 3}  # counted once
    assert state.record_evaluation("top1", 0.5, "max", step_tag(5)) and state.best.step == 5
    assert not state.record_evaluation("top1", 0.4, "max", step_tag(5)) and state.best.value == 0.5


def test_a_decision_on_rank_zero_reaches_every_rank_with_its_error():
    assert dist.on_main(lambda: {"plan": 3}) == {"plan": 3}

    def refuse():
        raise RunLockedError("run/run.lock: held by pid 7")

    with pytest.raises(RunLockedError, match="held by pid 7"):
        dist.on_main(refuse)
