"""The run's state without DeepSpeed: the schedule and stream position, TrainState round trips, when to save,
and what a launch resumes from (plan_resume reads files only)."""

from __future__ import annotations

import json

import pytest

from livt_ds.checkpoint import STATE_FILE, CheckpointError, CheckpointManager, plan_resume, step_tag
from livt_ds.config import CheckpointConfig
from livt_ds.data.pipeline import StreamPosition
from livt_ds.train_state import Best, Schedule, StateError, TrainState, write_status

SCHEDULE = Schedule(steps_per_epoch=5, total_steps=15, warmup_steps=2, accumulation=3, global_batch=24, base_lr=0.1,
                    min_lr=0.01)


def test_stream_position_is_the_epoch_and_the_micro_batches_already_consumed():
    p = SCHEDULE.stream_position(7, seed=3, rank=1, world=2, workers=4)
    assert p == StreamPosition(seed=3, epoch=1, rank=1, world=2, workers=4, batches=15, skip=2 * 3)
    assert SCHEDULE.stream_position(10, seed=3, rank=0, world=2, workers=4).skip == 0  # an epoch boundary
    assert p.without_rank() == {"seed": 3, "epoch": 1, "world": 2, "workers": 4, "batches": 15, "skip": 6}
    with pytest.raises(ValueError, match="skip_batches 16"):
        StreamPosition(seed=0, epoch=0, rank=0, world=1, workers=0, batches=15, skip=16)


def test_schedule_lr_is_warmup_then_cosine_to_min_lr():
    assert SCHEDULE.lr(0) == pytest.approx(0.05) and SCHEDULE.lr(1) == pytest.approx(0.1)
    assert SCHEDULE.lr(15) == pytest.approx(0.01)
    assert SCHEDULE.lr(2 + 13 / 2) == pytest.approx((0.1 + 0.01) / 2)


def test_train_state_round_trips_and_refuses_a_newer_version():
    state = TrainState("finetune", step=12, best=Best("top1", 55.5, 10, step_tag(10)), last_saved=12,
                       stream={"epoch": 2, "skip": 6}, skipped={"samples": 3, "shards": 1})
    again = TrainState.from_dict(json.loads(json.dumps(state.to_dict())), "x")
    assert again == state
    with pytest.raises(StateError, match="version 99 is newer"):
        TrainState.from_dict({**state.to_dict(), "version": 99}, "ckpt")
    legacy = TrainState.from_dict({"step": 4, "stage": "pretrain", "best": {}}, "old")  # earlier client state
    assert (legacy.step, legacy.stage, legacy.best) == (4, "pretrain", None)


def test_best_follows_the_metric_direction():
    state = TrainState("pretrain")
    assert state.better("recon_loss", 0.5, "min") and not state.better("recon_loss", None, "min")
    state.best = Best("recon_loss", 0.5, 5, step_tag(5))
    assert state.better("recon_loss", 0.4, "min") and not state.better("recon_loss", 0.6, "min")
    assert state.better("top1", 0.6, "max") and not state.better("top1", 0.4, "max")


def test_saves_after_evaluations_every_n_steps_and_at_the_last_step(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(every_steps=4, keep_last=2))
    due = [s for s in range(1, 13) if manager.due(s, evaluated=s % 5 == 0, final=s == 11)]
    assert due == [4, 5, 8, 10, 11, 12]
    never = CheckpointManager(tmp_path, CheckpointConfig(every_steps=0, keep_last=2))
    assert [s for s in range(1, 9) if never.due(s, evaluated=False, final=s == 8)] == [8]


def fake_tag(ckpt_dir, step: int, ranks: int = 2, complete: bool = True):
    """A tag folder with the file names DeepSpeed writes (contents are not read by plan_resume)."""
    tag = ckpt_dir / step_tag(step)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    for r in range(ranks):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    if complete:
        (tag / STATE_FILE).write_text("{}")
    return tag


def test_plan_resume_reads_latest_and_the_world_size(tmp_path):
    run = tmp_path / "run"
    assert plan_resume(run, "auto", 2) is None  # a fresh run folder
    ckpt = run / "checkpoints"
    fake_tag(ckpt, 4)
    fake_tag(ckpt, 8, complete=False)  # killed while saving: 'latest' was never moved to it
    (ckpt / "latest").write_text(step_tag(4))
    plan = plan_resume(run, "auto", 2)
    assert (plan.tag, plan.saved_world, plan.needs_universal, plan.load_tag) == (step_tag(4), 2, False, step_tag(4))
    plan = plan_resume(run, "auto", 1)
    assert plan.needs_universal and plan.load_tag == f"{step_tag(4)}_universal"
    with pytest.raises(CheckpointError, match="--resume none: .* holds checkpoints of an earlier run"):
        plan_resume(run, "none", 2)
    assert plan_resume(run, "none", 2, overwrite=True) is None
    assert plan_resume(run, str(ckpt / step_tag(4)), 2).tag == step_tag(4)
    with pytest.raises(CheckpointError, match="incomplete"):
        plan_resume(run, str(ckpt / step_tag(8)), 2)
    with pytest.raises(CheckpointError, match="neither a run folder"):
        plan_resume(run, str(tmp_path / "nowhere"), 2)
    (ckpt / "latest").write_text(step_tag(12))
    with pytest.raises(CheckpointError, match="is missing"):
        plan_resume(run, "auto", 2)


def test_status_names_the_phase(tmp_path):
    write_status(tmp_path, "save", 7)
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["phase"], status["step"]) == ("save", 7)
    with pytest.raises(ValueError, match="unknown phase"):
        write_status(tmp_path, "nap", 7)
